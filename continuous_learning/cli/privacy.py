"""`cl forget`, `cl retention` and `cl export`: what the privacy rules give each user."""
from __future__ import annotations

import sys
from pathlib import Path

import typer

from .support import console, err_console, print_json, settings_from


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `cl` app."""
    app.command("forget")(forget_cmd)
    app.command("retention")(retention_cmd)
    app.command("export")(export_cmd)


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


