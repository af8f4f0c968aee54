"""`cl eval`, `cl promote` and `cl rollback`: judging adapters and moving the champion pointer."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from .progress import dim_line
from .support import console, print_json, settings_from


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `cl` app."""
    app.command("eval")(eval_cmd)
    app.command("promote")(promote_cmd)
    app.command("rollback")(rollback_cmd)


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
        progress=None if as_json else dim_line,
    )
    if as_json:
        print_json(report)
        return
    print_eval_report(report, no_promote)


def print_eval_report(report: dict, no_promote: bool) -> None:
    console.print(_eval_table(report["subject"], report["against"]))
    _eval_print_gate(report, no_promote)


def _eval_cell(passed: bool | None) -> str:
    return "" if passed is None else ("[green]pass[/green]" if passed else "[red]fail[/red]")


def clip(text: str, width: int = 70) -> str:
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
        prompt = clip(item["prompt"])
        if differs:
            prompt += "".join(f"\n[dim]{r['label']}: {clip(r_item['answer'], 80)}[/dim]" for r,
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


def promote_cmd(
    ctx: typer.Context,
    version: str = typer.Argument(..., help="Adapter version to make the champion."),
    reason: str = typer.Option("manual promotion", "--reason", help="Why (kept in the history)."),
) -> None:
    """Make VERSION the champion now, without the gate (its files are still checked)."""
    from ..registry import label, promote_version

    moved = promote_version(settings_from(ctx), version, reason, forced=True)
    console.print(f"champion: {label(moved['from'])} -> {label(moved['to'])}")


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

