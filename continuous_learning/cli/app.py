"""`cl`: parse, call, render. Library errors (CLError) become one red line and an exit code here."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from ..core.errors import CLError, NothingToDo
from ..core.settings import Settings, describe
from . import loop as cli_loop
from . import monitor as cli_monitor
from . import serve as cli_serve
from .support import console, err_console, print_json, settings_from


class _Group(TyperGroup):
    """Turns CLError (and unexpected errors) into one line + exit code, unless --debug."""

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except NothingToDo as exc:
            console.print(exc.message + (f" ({exc.hint})" if exc.hint else ""), markup=False)
            raise typer.Exit(exc.exit_code) from None
        except CLError as exc:
            if _debug(ctx):
                raise
            hint = f" [dim]({escape(exc.hint)})[/dim]" if exc.hint else ""
            err_console.print(f"[red]error:[/red] {escape(exc.message)}{hint}", soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except Exception as exc:  # an unexpected failure still gets one line; the traceback is behind --debug
            if _debug(ctx) or _is_cli_flow(exc):
                raise
            err_console.print(
                f"[red]error:[/red] {type(exc).__name__}: {escape(str(exc))} [dim](run with --debug for the "
                f"traceback)[/dim]",
                soft_wrap=True,
            )
            raise typer.Exit(1) from None


def _is_cli_flow(exc: Exception) -> bool:
    """Typer's own exits, aborts and usage errors pass through untouched."""
    return isinstance(exc, (typer.Exit, typer.Abort)) or type(exc).__module__.startswith(("typer", "click"))


def _debug(ctx: typer.Context) -> bool:
    return bool(ctx.obj and ctx.obj.get("debug")) or "--debug" in sys.argv


app = typer.Typer(
    cls=_Group,
    help="Local-first continuous learning for chat models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def root(
    ctx: typer.Context,
    home: Path | None = typer.Option(None, "--home", envvar="CL_HOME", help="Workspace root (default: current "
                                                                            "folder)."),
    base_model: str | None = typer.Option(None, "--base-model", help="Base model: local HF folder, cached hub id or "
                                                                     ".gguf file."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    ctx.obj = {"home": home, "base_model": base_model, "debug": debug}


# --- config ------------------------------------------------------------------------------------------
@app.command("config")
def config_cmd(ctx: typer.Context, as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Show every setting with its resolved value (flags > env > cl.toml > defaults)."""
    settings = settings_from(ctx)
    if as_json:
        print_json(settings.as_dict())
        return
    table = Table("setting", "value", "meaning")
    for key, value, help_text in describe(settings):
        table.add_row(key, value, help_text)
    console.print(table)


# === chat / ingest / feedback / knowledge ===
@app.command("chat")
def chat_cmd(
    ctx: typer.Context,
    user: str | None = typer.Option(None, "--user", help="Who is chatting (stored only as a salted hash; default: "
                                                         "login name)."),
    system: str | None = typer.Option(None, "--system", help="System prompt for this session."),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", help="Longest answer in tokens."),
    temperature: float | None = typer.Option(None, "--temperature", help="0 = greedy."),
) -> None:
    """Chat with the champion model; rate each answer so the model can learn from it."""
    from ..chat import repl

    settings = settings_from(ctx, chat={"system_prompt": system, "max_new_tokens": max_new_tokens,
                                        "temperature": temperature})
    repl.run(settings, user_id=user, console=console)


@app.command("ingest")
def ingest_cmd(
    ctx: typer.Context,
    file: Path = typer.Argument(..., help="JSONL: {messages:[...]} or {prompt, response} per line, optional feedback."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Import interactions from another app's logs through the same sanitizer and schema."""
    from ..capture.ingest import ingest_file

    settings = settings_from(ctx)
    with console.status(f"Importing {file} (sanitizing)..."):
        report = ingest_file(settings, file)
    if as_json:
        print_json({"imported": report.imported, "skipped": [{"line": n, "reason": r} for n, r in report.skipped]})
    else:
        console.print(f"imported {report.imported} interaction(s) into {settings.raw_log}")
        for number, reason in report.skipped[:20]:
            err_console.print(f"[yellow]skipped line {number}:[/yellow] {escape(reason)}", soft_wrap=True)
        if len(report.skipped) > 20:
            err_console.print(f"[yellow]... and {len(report.skipped) - 20} more skipped lines[/yellow]")
    if report.skipped:
        raise typer.Exit(3)


@app.command("feedback")
def feedback_cmd(
    ctx: typer.Context,
    interaction_id: str = typer.Argument(..., help="Interaction id (from the chat or the raw log)."),
    score: int | None = typer.Option(None, "--score", min=1, max=5, help="1-5."),
    helpful: bool | None = typer.Option(None, "--helpful/--unhelpful", help="Thumbs up or down."),
    comment: str | None = typer.Option(None, "--comment"),
    correction: str | None = typer.Option(None, "--correction", help="The answer the model should have given."),
    private: bool = typer.Option(False, "--private", help="Never train on this turn."),
    user: str | None = typer.Option(None, "--user", help="Who gives the feedback."),
) -> None:
    """Rate a logged interaction later (appended as its own event; the log is never rewritten)."""
    from ..capture.ingest import Recorder, find_interaction
    from ..core.records import Feedback

    feedback = Feedback(score=score, helpful=helpful, comment=comment, correction=correction, private=private or None)
    if feedback.is_empty():
        raise CLError("nothing to record", "give --score, --helpful/--unhelpful, --correction, --comment or --private")
    settings = settings_from(ctx)
    interaction = find_interaction(settings, interaction_id)
    event = Recorder(settings).record_feedback(interaction, feedback, user_id=user, source="cli")
    console.print(f"recorded feedback {event.id} for interaction {interaction_id}")


@app.command("knowledge")
def knowledge_cmd(ctx: typer.Context, as_json: bool = typer.Option(False, "--json")) -> None:
    """Facts (lot, batch, part identifiers...) mentioned in chats, with counts and first/last seen."""
    from ..capture.knowledge import load_facts

    settings = settings_from(ctx)
    facts = load_facts(settings.knowledge_file)
    if as_json:
        print_json(facts)
        return
    if not facts:
        console.print("no facts recorded yet (patterns: knowledge.patterns in cl.toml)")
        return
    table = Table("fact", "count", "first seen", "last seen")
    for fact in facts:
        table.add_row(fact["fact"], str(fact["count"]), fact["first_seen"], fact["last_seen"])
    console.print(table)


# === curate / snapshots ===
class _StageProgress:
    """Rich progress bars on stderr, one per phase, fed by a library `progress(phase, done, total)` callback."""

    def __init__(self, enabled: bool):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                             console=err_console, transient=True, disable=not enabled)
        self._tasks: dict[str, Any] = {}

    def __enter__(self):
        self._bar.__enter__()
        return self.update

    def __exit__(self, *exc: Any) -> None:
        self._bar.__exit__(*exc)

    def update(self, phase: str, done: int, total: int | None) -> None:
        if phase not in self._tasks:
            self._tasks[phase] = self._bar.add_task(phase, total=total)
        self._bar.update(self._tasks[phase], completed=done, total=total)


def _curate_rows(counts: dict) -> list[tuple[str, int]]:
    rows = [(f"selected: {kind}", n) for kind, n in counts["selected"].items()]
    rows += [(f"dropped: {reason}", n) for reason, n in counts["dropped"].items() if n]
    rows += [("deduped: exact", counts["deduped"]["exact"]), ("deduped: near", counts["deduped"]["near"])]
    rows += [(f"capped: {domain} (deferred to the next run)", n) for domain, n in counts["capped"]["by_domain"].items()]
    rows += [("late feedback picked up", counts["late_feedback"]), ("deferred turns taken now", counts["deferred"]),
             ("replayed from earlier snapshots", counts["replayed"])]
    if counts["bad_lines"] or counts["bad_records"]:
        rows.append(("unreadable log lines/records (skipped)", counts["bad_lines"] + counts["bad_records"]))
    return rows + [("train examples", counts["train"]), ("eval examples", counts["eval"])]


def _print_curate_summary(manifest: dict) -> None:
    if manifest["status"] != "created":
        console.print(manifest["message"])
        return
    table = Table("rule", "count", title=f"snapshot {manifest['id']}")
    for label, count in _curate_rows(manifest["counts"]):
        table.add_row(label, str(count))
    console.print(table)
    console.print(f"wrote {manifest['files']['train']} and {manifest['files']['eval']} (manifest: "
                  f"{manifest['files']['manifest']})")


@app.command("curate")
def curate_cmd(
    ctx: typer.Context,
    full: bool = typer.Option(False, "--full", help="Rebuild from all logs, ignoring where the last snapshot stopped."),
    include_unrated: bool = typer.Option(False, "--include-unrated", help="Also train on turns nobody rated (low "
                                                                          "weight)."),
    note: str | None = typer.Option(None, "--note", help="A note stored with the snapshot (and the adapter)."),
    train: bool = typer.Option(False, "--train", help="Then train an adapter on the new snapshot."),
    evaluate: bool = typer.Option(False, "--eval", help="Then evaluate the new adapter and promote it if it is "
                                                        "better."),
    no_promote: bool = typer.Option(False, "--no-promote", help="With --eval: show the gate decision but never "
                                                                "promote."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest (and later stages' results) as JSON."),
) -> None:
    """Turn new rated turns into a versioned training snapshot in data/curated/ (--train --eval: the whole loop)."""
    from ..curate import run_curate
    from ..evaluate import check_eval_ready, evaluate_and_gate

    if evaluate and not train:
        raise CLError("--eval needs --train", "use 'cl eval' to evaluate an existing adapter")
    settings = settings_from(ctx)
    if evaluate:
        plan = check_eval_ready(settings)  # a bad keyword file fails now, not after minutes of training
        if not as_json:
            _dim_line(plan)
    started = time.perf_counter()
    with _StageProgress(enabled=not as_json) as progress:
        manifest = run_curate(settings, full=full, include_unrated=True if include_unrated else None, note=note,
                              progress=progress)
    stages = {"curate": time.perf_counter() - started}
    results: dict[str, Any] = {"curate": manifest}
    if not as_json:
        _print_curate_summary(manifest)
    if train and manifest["status"] == "created":
        entry = _train_with_progress(settings, snapshot=manifest["id"], note=note, quiet=as_json)
        results["train"] = entry
        stages.update(training_stages(entry))
        if not as_json:
            _print_trained(settings, entry)
        if evaluate:
            started = time.perf_counter()
            report = evaluate_and_gate(settings, candidate=entry["version"], promote=not no_promote,
                                       progress=None if as_json else _dim_line)
            stages["evaluate and gate"] = time.perf_counter() - started
            results["eval"] = report
            if not as_json:
                _print_eval_report(report, no_promote)
        results["seconds"] = {name: round(value, 2) for name, value in stages.items()}
        if not as_json:
            console.print(f"[dim]where the time went: {time_breakdown(stages)}[/dim]")
    elif train and not as_json:
        console.print("nothing to train on")
    if as_json:
        print_json(results if train else manifest)


@app.command("snapshots")
def snapshots_cmd(ctx: typer.Context, as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List the curated training snapshots, oldest first."""
    from .. import registry

    snapshots = registry.load(settings_from(ctx))["snapshots"]
    if as_json:
        print_json(snapshots)
        return
    if not snapshots:
        console.print("no snapshots yet - create one with 'cl curate'")
        return
    table = Table(box=None, pad_edge=False, header_style="bold")
    table.add_column("id", no_wrap=True, min_width=max(len(s["id"]) for s in snapshots))
    table.add_column("created (UTC)", no_wrap=True)
    for name in ("train", "eval", "replay"):
        table.add_column(name, justify="right", no_wrap=True, min_width=len(name))
    table.add_column("sha256", no_wrap=True, min_width=8)
    table.add_column("note", min_width=8, overflow="fold")
    for snap in snapshots:
        counts = snap.get("counts") or {}
        created = str(snap.get("created_at", ""))[:16].replace("T", " ")
        table.add_row(snap["id"], created, str(snap.get("train_examples", "")), str(snap.get("eval_examples", "")),
                      str(counts.get("replayed", "")), str(snap.get("sha256") or "")[:8],
                      escape(snap.get("note") or ""))
    console.print(table)


# === train / eval / adapters / promote / rollback ===
@app.command("train")
def train_cmd(
    ctx: typer.Context,
    snapshot: str | None = typer.Option(None, "--snapshot", help="Snapshot id to train on (default: the newest)."),
    fresh: bool = typer.Option(False, "--fresh", help="Start from the base model instead of the champion adapter."),
    resume: bool = typer.Option(False, "--resume", help="Continue the newest interrupted run from its last "
                                                        "checkpoint."),
    four_bit: bool | None = typer.Option(None, "--4bit/--no-4bit", help="QLoRA (4-bit NF4 base) or full precision."),
    steps: int | None = typer.Option(None, "--steps", help="Exactly N optimizer steps (default: follow the data)."),
    epochs: int | None = typer.Option(None, "--epochs", help="Exactly N passes over the snapshot (default: "
                                                             "train.epochs, within min/max steps)."),
    lr: float | None = typer.Option(None, "--lr", help="Peak learning rate."),
    rank: int | None = typer.Option(None, "--rank", help="LoRA rank."),
    alpha: int | None = typer.Option(None, "--alpha", help="LoRA alpha."),
    dropout: float | None = typer.Option(None, "--dropout", help="LoRA dropout."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Examples per micro-batch."),
    grad_accum: int | None = typer.Option(None, "--grad-accum", help="Micro-batches per optimizer step."),
    max_seq_len: int | None = typer.Option(None, "--max-seq-len", help="Longest training sequence in tokens."),
    seed: int | None = typer.Option(None, "--seed", help="Random seed."),
    num_processes: int | None = typer.Option(None, "--num-processes", help="Data-parallel training processes (launched "
                                                                           "with torchrun)."),
    objective: str | None = typer.Option(
        None, "--objective", help="auto (SFT, plus KTO / DPO for 'no' answers and corrections), sft, kto or dpo."),
    note: str | None = typer.Option(None, "--note", help="A note stored with the adapter version."),
    as_json: bool = typer.Option(False, "--json", help="Print the registry entry as JSON (no progress bar)."),
) -> None:
    """Fine-tune a LoRA adapter (QLoRA by default) on a curated snapshot; registers it as a candidate."""
    from ..train import step_overrides

    settings = settings_from(
        ctx,
        train={
            "load_in_4bit": four_bit,
            **step_overrides(steps, epochs),
            "learning_rate": lr,
            "lora_r": rank,
            "lora_alpha": alpha,
            "lora_dropout": dropout,
            "batch_size": batch_size,
            "grad_accum": grad_accum,
            "max_seq_len": max_seq_len,
            "seed": seed,
            "num_processes": num_processes,
            "objective": objective,
        },
    )
    entry = _train_with_progress(settings, snapshot=snapshot, fresh=fresh, resume=resume, note=note, quiet=as_json)
    if as_json:
        print_json(entry)
    else:
        _print_trained(settings, entry)


def _train_with_progress(settings: Settings, snapshot: str | None = None, fresh: bool = False, resume: bool = False,
                         note: str | None = None, quiet: bool = False) -> dict:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ..train import run_training

    as_json = quiet
    bar = Progress(
        TextColumn("[bold]training"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[tps]} tok/s"),
        TextColumn("ETA {task.fields[eta]}"),
        TimeElapsedColumn(),
        console=err_console,
        disable=as_json,
    )
    task = bar.add_task("train", total=None, loss="-", tps="-", eta="-")

    def show(event: dict) -> None:
        kind = event.get("event")
        if kind == "step":
            eta = int(event.get("eta_s") or 0)
            bar.update(
                task,
                completed=event["step"],
                total=event["total_steps"],
                loss=f"{event['loss']:.3f}",
                tps=f"{event['tokens_per_s']:.0f}",
                eta=f"{eta // 60}:{eta % 60:02d}",
            )
        elif kind == "start":
            bar.update(task, completed=event.get("step", 0), total=event.get("total_steps"))
        elif kind == "warning":
            bar.console.print(f"[yellow]warning:[/yellow] {event['message']}")
        elif kind == "status" and not as_json:
            bar.console.print(f"[dim]{event['message']}[/dim]")

    with bar:
        return run_training(settings, snapshot_id=snapshot, fresh=fresh, resume=resume, note=note, progress=show)


def _print_trained(settings: Settings, entry: dict) -> None:
    metrics = entry.get("metrics", {})
    start = f"from {entry['parent']}" if entry.get("parent") else "from the base model"
    console.print(
        f"[green]adapter {entry['version']}[/green] (candidate) trained {start} on snapshot {entry['snapshot']['id']}: "
        f"{metrics.get('steps')} steps, loss {metrics.get('initial_loss', 0):.3f} -> "
        f"{metrics.get('final_loss', 0):.3f}, "
        f"{metrics.get('tokens_per_s', 0):.0f} tok/s, {metrics.get('seconds', 0):.0f} s"
    )
    if metrics.get("eval_loss") is not None:
        console.print(f"  held-out loss {metrics.get('eval_loss_start', float('nan')):.3f} -> "
                      f"{metrics['eval_loss']:.3f}")
    if metrics.get("rejected_loglik") is not None:
        console.print(f"  objective {metrics.get('objective')}: rejected answers' mean log-likelihood "
                      f"{metrics.get('rejected_loglik_start', float('nan')):.3f} -> {metrics['rejected_loglik']:.3f}")
    console.print(f"  saved in {settings.home / entry['path']}")
    console.print(f"  [dim]time: {time_breakdown(training_stages(entry))}[/dim]")
    console.print("  next: evaluate it with 'cl eval'")


def training_stages(entry: dict) -> dict[str, float]:
    """Where a training run's time went, from its recorded timings."""
    t = entry.get("timings") or {}
    return {"prepare data": t.get("prepare_s", 0.0), "load model": t.get("model_s", 0.0),
            "train": t.get("train_loop_s", 0.0), "held-out loss": t.get("held_out_s", 0.0),
            "save": t.get("save_s", 0.0)}


def time_breakdown(stages: dict[str, float]) -> str:
    total = sum(stages.values())
    return ", ".join(f"{name} {seconds:.1f} s" for name, seconds in stages.items()
                     if seconds >= 0.05) + f" (total {total:.0f} s)"



@app.command("eval")
def eval_cmd(
    ctx: typer.Context,
    version: str | None = typer.Argument(None, help="Version to evaluate, or 'base' (default: the newest candidate, "
                                                    "else the champion)."),
    against: str | None = typer.Option(None, "--against", help="VERSION, 'champion', 'base' or 'none' (default: the "
                                                               "champion, else the base)."),
    eval_file: Path | None = typer.Option(None, "--eval-file", help="Keyword QA file (default: eval/qa_eval.jsonl in "
                                                                    "the workspace)."),
    snapshot: str | None = typer.Option(None, "--snapshot", help="Snapshot whose held-out slice gives the eval loss "
                                                                 "(default: the candidate's)."),
    no_general: bool = typer.Option(False, "--no-general", help="Skip the shipped general-ability set."),
    no_promote: bool = typer.Option(False, "--no-promote", help="Show the gate decision but never promote."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Evaluate a candidate against the champion (or the base) side by side, then gate and promote."""
    from ..evaluate import evaluate_and_gate

    settings = settings_from(ctx)
    report = evaluate_and_gate(
        settings,
        candidate=version,
        eval_file=eval_file.expanduser().resolve() if eval_file else None,
        promote=not no_promote,
        against=against,
        snapshot=snapshot,
        include_general=not no_general,
        progress=None if as_json else _dim_line,
    )
    if as_json:
        print_json(report)
        return
    _print_eval_report(report, no_promote)


def _dim_line(message: str) -> None:
    err_console.print(f"[dim]{escape(message)}[/dim]")


def _print_eval_report(report: dict, no_promote: bool) -> None:
    console.print(_eval_table(report["subject"], report["against"]))
    _eval_print_gate(report, no_promote)


def _eval_cell(passed: bool | None) -> str:
    return "" if passed is None else ("[green]pass[/green]" if passed else "[red]fail[/red]")


def _eval_clip(text: str, width: int = 70) -> str:
    text = " ".join(text.split())
    return escape(text if len(text) <= width else text[: width - 1] + "…")


def _eval_table(subject: dict, other: dict | None) -> Table:
    results = [subject] + ([other] if other else [])
    table = Table(title=f"keyword QA: {subject['eval_file']['path']}", show_lines=False)
    table.add_column("#", justify="right")
    table.add_column("prompt")
    for result in results:
        table.add_column(result["label"], justify="center")
    theirs = {item["prompt"]: item for item in other["items"]} if other else {}
    for number, item in enumerate(subject["items"], start=1):
        peer = theirs.get(item["prompt"])
        differs = peer is not None and peer["passed"] != item["passed"]
        prompt = _eval_clip(item["prompt"])
        if differs:
            prompt += "".join(f"\n[dim]{r['label']}: {_eval_clip(r_item['answer'], 80)}[/dim]" for r,
                              r_item in zip(results, (item, peer)))
        table.add_row(str(number), prompt, *[_eval_cell(x["passed"]) for x in (item, peer) if x is not None],
                      style="bold" if differs else None)
    table.add_section()
    for name, cell in _eval_summary_rows():
        table.add_row("", name, *[cell(r) for r in results])
    return table


def _eval_summary_rows() -> list[tuple[str, Any]]:
    def pct(passed: Any, total: Any) -> str:
        return f"{passed}/{total} ({passed / total:.0%})" if total else "-"

    def loss(r: dict) -> str:
        return "-" if r.get("eval_loss") is None else f"{r['eval_loss']:.3f} (ppl {r['perplexity']:.1f})"

    return [
        ("accuracy", lambda r: pct(r["passed"], r["total"])),
        ("general accuracy", lambda r: pct(r["general"]["passed"], r["general"]["total"]) if r.get("general") else "-"),
        ("eval loss", loss),
        ("rejected answers (log-lik.)", lambda r: _loglik_cell(r, "rejected")),
        ("corrections / desirable (log-lik.)", lambda r: _loglik_cell(r, "chosen")),
        ("tokens/s", lambda r: "-" if r.get("tokens_per_s") is None else f"{r['tokens_per_s']:.1f}"),
        ("latency / prompt", lambda r: "-" if r.get("latency_ms_per_prompt") is None
         else f"{r['latency_ms_per_prompt']:.0f} ms"),
    ]


def _loglik_cell(result: dict, which: str) -> str:
    """Mean per-token log-likelihood of one kind of answer, and where the answers came from."""
    value = result.get(f"{which}_loglik")
    if value is None:
        return "-"
    where = "held out" if result.get("preference_eval") == "held_out" else "trained"
    return f"{value:.3f} ({result.get(f'{which}_answers', '?')} {where})"


def _eval_print_gate(report: dict, no_promote: bool) -> None:
    decision = report["decision"]
    if decision is None:
        console.print("[dim]no promotion decision: only a candidate compared with the champion (or the base) is "
                      "gated[/dim]")
        return
    verdict = "[green]promote[/green]" if decision["promote"] else "[yellow]keep as candidate[/yellow]"
    console.print(f"gate: {verdict}")
    console.print(escape(decision.get("summary") or "; ".join(decision["reasons"])), soft_wrap=False)
    if report["promoted"]:
        console.print(f"[green]{report['subject']['label']} is now the champion[/green]")
    elif decision["promote"] and no_promote:
        console.print(f"not promoted (--no-promote): run 'cl promote {report['subject']['label']}' to do it")


@app.command("promote")
def promote_cmd(
    ctx: typer.Context,
    version: str = typer.Argument(..., help="Adapter version to make the champion."),
    reason: str = typer.Option("manual promotion", "--reason", help="Why (kept in the history)."),
) -> None:
    """Make VERSION the champion now, without the gate (its files are still checked)."""
    from ..registry import label, promote_version

    moved = promote_version(settings_from(ctx), version, reason, forced=True)
    console.print(f"champion: {label(moved['from'])} -> {label(moved['to'])}")


@app.command("rollback")
def rollback_cmd(
    ctx: typer.Context,
    steps: int = typer.Option(1, "--steps", help="Promotions to undo."),
    to: str | None = typer.Option(None, "--to", help="Version to serve instead (or 'base')."),
    reason: str = typer.Option("", "--reason", help="Why (kept in the history)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Move the champion pointer back (the target's files are checked against their sha256 first)."""
    from ..registry import label, rollback_champion

    moved = rollback_champion(settings_from(ctx), steps=steps, to=to, reason=reason)
    if as_json:
        print_json(moved)
        return
    console.print(f"champion: {label(moved['from'])} -> {label(moved['to'])} [dim]({moved['seconds'] * 1000:.0f} "
                  f"ms)[/dim]")


adapters_app = typer.Typer(
    help="List adapter versions; 'show VERSION' for one's lineage; 'export VERSION' for llama.cpp / Ollama.",
    no_args_is_help=False,
)
app.add_typer(adapters_app, name="adapters")


def _adapter_rows(doc: dict) -> list[dict]:
    from ..registry import latest_eval, sorted_versions

    rows = []
    for version in sorted_versions(doc):
        entry, last = doc["adapters"][version], latest_eval(doc["adapters"][version])
        rows.append({
            "version": version,
            "status": entry["status"],
            "champion": doc["champion"] == version,
            "accuracy": last.get("accuracy") if last else None,
            "general_accuracy": last.get("general_accuracy") if last else None,
            "created_at": entry.get("created_at"),
            "note": entry.get("note"),
        })
    return rows


@adapters_app.callback(invoke_without_command=True)
def adapters_cmd(ctx: typer.Context, as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Adapter versions with status and latest eval scores; the champion is marked with *."""
    if ctx.invoked_subcommand:
        return
    from .. import registry

    doc = registry.load(settings_from(ctx))
    rows = _adapter_rows(doc)
    if as_json:
        print_json({"champion": doc["champion"], "adapters": rows})
        return
    if not rows:
        console.print("no adapters yet: train one with 'cl train'")
        return
    table = Table("", "version", "status", "accuracy", "general", "created", "note")
    for row in rows:
        acc = "-" if row["accuracy"] is None else f"{row['accuracy']:.0%}"
        gen = "-" if row["general_accuracy"] is None else f"{row['general_accuracy']:.0%}"
        table.add_row("*" if row["champion"] else "", row["version"], row["status"], acc, gen,
                      (row["created_at"] or "")[:19], _eval_clip(row["note"] or "", 40))
    console.print(table)
    if doc["champion"] is None:
        console.print("[dim]no champion: the base model is serving[/dim]")


@adapters_app.command("show")
def adapters_show_cmd(
    ctx: typer.Context,
    version: str = typer.Argument(..., help="Adapter version."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """One adapter's lineage: base model, snapshot, parent chain, hyperparameters, metrics and evals."""
    from .. import registry
    from ..registry import adapter

    doc = registry.load(settings_from(ctx))
    entry = adapter(doc, version)
    chain = _adapter_parents(doc, version)
    if as_json:
        print_json({**entry, "champion": doc["champion"] == version, "parent_chain": chain})
        return
    _adapter_print_lineage(entry, chain, doc["champion"] == version)


@adapters_app.command("export")
def adapters_export_cmd(
    ctx: typer.Context,
    version: str = typer.Argument(..., help="Adapter version, 'champion' or 'base'."),
    formats: list[str] | None = typer.Option(
        None, "--format", "-f", help="gguf-lora, gguf-merged or hf-merged; repeat for several (default: all)."),
    quants: list[str] | None = typer.Option(
        None, "--quant", help="Merged GGUF type f16 or q8_0; repeat for both (default: both)."),
    out: Path | None = typer.Option(None, "--out", help="Folder to write (default: exports/<version>/ in the "
                                                        "workspace)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Export for llama.cpp / Ollama (GGUF LoRA + F16 base, merged GGUF) and as a merged Hugging Face folder."""
    from ..export import DEFAULT_QUANTS, FORMATS, export_model

    settings = settings_from(ctx)
    result = export_model(settings, version, formats=tuple(formats or FORMATS),
                          quants=tuple(quants or DEFAULT_QUANTS), out=out, progress=None if as_json else _dim_line)
    if as_json:
        print_json(result.to_dict())
        return
    console.print(f"exported {result.label} on {result.base_name} to {result.folder} in {result.seconds:.0f} s")
    for item in result.files:
        console.print(f"  {item.kind:<12} {item.bytes / 1e6:8.1f} MB  {item.path.name}")
    console.print("use it with:")
    for line in result.commands:
        console.print(f"  {line}", markup=False, soft_wrap=True)


def _adapter_parents(doc: dict, version: str) -> list[str]:
    chain, seen = [], {version}
    parent = doc["adapters"][version].get("parent")
    while parent and parent not in seen:
        chain.append(parent)
        seen.add(parent)
        parent = (doc["adapters"].get(parent) or {}).get("parent")
    return chain


def _adapter_pairs(data: dict | None) -> str:
    return ", ".join(f"{k}={escape(str(v))}" for k, v in (data or {}).items()) or "-"


def _adapter_print_lineage(entry: dict, chain: list[str], is_champion: bool) -> None:
    base, snap = entry.get("base_model") or {}, entry.get("snapshot") or {}
    status = entry["status"] + (" (champion)" if is_champion and entry["status"] != "champion" else "")
    console.print(f"[bold]adapter {entry['version']}[/bold]  {status}  created {entry.get('created_at', '-')}")
    console.print(f"  path:            {entry.get('path', '-')}")
    console.print(f"  note:            {_eval_clip(entry.get('note') or '-', 200)}")
    console.print(f"  base model:      {base.get('name', '-')} (sha256 {str(base.get('sha256', '-'))[:12]})")
    console.print(f"  snapshot:        {snap.get('id', '-')} (sha256 {str(snap.get('sha256', '-'))[:12]})")
    console.print(f"  lineage:         {' <- '.join([entry['version'], *chain, 'base'])}")
    console.print(f"  hyperparameters: {_adapter_pairs(entry.get('hyperparameters'))}")
    scalars = {k: v for k, v in (entry.get("metrics") or {}).items() if not isinstance(v, (list, dict))}
    console.print(f"  metrics:         {_adapter_pairs(scalars)}")
    console.print(f"  libraries:       {_adapter_pairs(entry.get('library_versions'))}")
    console.print(f"  files:           "
                  f"{_adapter_pairs({k: str(v)[:12] for k, v in (entry.get('sha256') or {}).items()})}")
    evals = entry.get("evals") or []
    if not evals:
        console.print("  evals:           none yet (run 'cl eval')")
        return
    table = Table("when", "eval file", "accuracy", "general", "eval loss", "tokens/s", title="evals")
    for e in evals:
        general = "-" if e.get("general_accuracy") is None else f"{e['general_accuracy']:.0%}"
        loss = "-" if e.get("eval_loss") is None else f"{e['eval_loss']:.3f}"
        tps = "-" if e.get("tokens_per_s") is None else f"{e['tokens_per_s']:.1f}"
        table.add_row(str(e.get("created_at", ""))[:19], (e.get("eval_file") or {}).get("path", "-"),
                      f"{e.get('passed')}/{e.get('total')}", general, loss, tps)
    console.print(table)


# === privacy: forget / retention / export ===
@app.command("forget")
def forget_cmd(
    ctx: typer.Context,
    user: str = typer.Option(..., "--user", help="The user id to forget (hashed with the workspace salt, never "
                                                 "logged)."),
    yes: bool = typer.Option(False, "--yes", help="Do not ask for confirmation."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Delete one user's interactions, feedback and snapshot examples; taint the adapters trained on them."""
    from ..capture.gdpr import forget_user

    settings = settings_from(ctx)
    if not yes:
        typer.confirm("Permanently delete everything stored about this user?", abort=True)
    report = forget_user(settings, user)
    if as_json:
        print_json(report.to_dict())
        return
    if report.found_nothing:
        console.print("nothing stored for this user; nothing changed")
        return
    console.print(f"removed {report.interactions} interaction(s), {report.feedback_events} feedback event(s), "
                  f"{report.snapshot_examples} snapshot example(s) from {len(report.snapshots)} snapshot(s)")
    console.print(f"tainted {len(report.adapters_tainted)} adapter(s): {', '.join(report.adapters_tainted) or '-'}")
    if report.weights_deleted or report.partial_runs_discarded:
        console.print(f"deleted the weights of {', '.join(report.weights_deleted) or '-'}; discarded "
                      f"{len(report.partial_runs_discarded)} unfinished training run(s)")
    if report.champion_move:
        from ..registry import label

        move = report.champion_move
        console.print(f"champion: {label(move['from'])} -> {label(move['to'])} (the old one was trained on this user's "
                      f"data)")


@app.command("retention")
def retention_cmd(
    ctx: typer.Context,
    days: int = typer.Option(..., "--days", help="Drop raw interactions (and their feedback) older than this."),
) -> None:
    """Drop raw interactions older than N days from the log (atomic rewrite)."""
    from ..capture.gdpr import apply_retention
    from ..core.records import FEEDBACK, INTERACTION

    dropped = apply_retention(settings_from(ctx), days)
    console.print(f"dropped {dropped[INTERACTION]} interaction(s) and {dropped[FEEDBACK]} feedback event(s) older than "
                  f"{days} day(s)")


@app.command("export")
def export_cmd(
    ctx: typer.Context,
    user: str = typer.Option(..., "--user", help="The user id whose data to export."),
    out: Path | None = typer.Option(None, "--out", help="Write JSONL here (0600) instead of stdout."),
) -> None:
    """Everything stored about one user, as JSONL (right of access)."""
    from ..capture.gdpr import export_user
    from ..storage.store import atomic_write_jsonl, dumps_line

    items = list(export_user(settings_from(ctx), user))  # read (and decrypt) everything before writing anything
    if out is None:
        for record in items:
            sys.stdout.write(dumps_line(record).decode())
        return
    atomic_write_jsonl(out, items)
    err_console.print(f"exported {len(items)} record(s) to {out}")


# Command groups that live in their own modules (one module per area keeps this file short).
for _area in (cli_monitor, cli_loop, cli_serve):
    _area.register(app)


def main(argv: list[str] | None = None) -> None:
    app(args=argv, prog_name="cl")


if __name__ == "__main__":
    main()
