"""`cl curate`, `cl snapshots` and `cl train`: the learning loop's commands, all through `run_loop`."""
from __future__ import annotations

from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from ..core.errors import CLError
from ..core.settings import Settings
from ..loop.workflow import CURATE, EVAL, TRAIN, LoopOptions, run_loop
from .evaluation import print_eval_report
from .progress import LoopDisplay
from .support import console, print_json, settings_from


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `cl` app."""
    app.command("curate")(curate_cmd)
    app.command("snapshots")(snapshots_cmd)
    app.command("train")(train_cmd)


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
    if evaluate and not train:
        raise CLError("--eval needs --train", "use 'cl eval' to evaluate an existing adapter")
    settings = settings_from(ctx)
    options = LoopOptions(curate=True, full=full, include_unrated=True if include_unrated else None, note=note,
                          train=train, evaluate=evaluate, promote=not no_promote)
    show = _stage_printer(settings, no_promote)
    with LoopDisplay(quiet=as_json, show=show) as display:
        results: dict[str, Any] = run_loop(settings, options, display)
    if TRAIN in results:
        stages = {"curate": display.seconds[CURATE], **training_stages(results[TRAIN])}
        if EVAL in results:
            stages["evaluate and gate"] = display.seconds[EVAL]
        results["seconds"] = {name: round(value, 2) for name, value in stages.items()}
        if not as_json:
            console.print(f"[dim]where the time went: {time_breakdown(stages)}[/dim]")
    elif train and not as_json:
        console.print("nothing to train on")
    if as_json:
        print_json(results if train else results[CURATE])


def _stage_printer(settings: Settings, no_promote: bool):
    """What is printed when a stage of the loop is done."""

    def show(stage: str, result: dict) -> None:
        if stage == CURATE:
            _print_curate_summary(result)
        elif stage == TRAIN:
            _print_trained(settings, result)
        elif stage == EVAL:
            print_eval_report(result, no_promote)

    return show


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
    options = LoopOptions(train=True, snapshot=snapshot, fresh=fresh, resume=resume, note=note)
    with LoopDisplay(quiet=as_json, show=_stage_printer(settings, no_promote=False)) as display:
        entry = run_loop(settings, options, display)[TRAIN]
    if as_json:
        print_json(entry)


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
            "measure the base": t.get("kl_reference_s", 0.0) + t.get("preference_reference_s", 0.0),
            "train": t.get("train_loop_s", 0.0), "held-out loss": t.get("held_out_s", 0.0),
            "save": t.get("save_s", 0.0)}


def time_breakdown(stages: dict[str, float]) -> str:
    total = sum(stages.values())
    return ", ".join(f"{name} {seconds:.1f} s" for name, seconds in stages.items()
                     if seconds >= 0.05) + f" (total {total:.0f} s)"



