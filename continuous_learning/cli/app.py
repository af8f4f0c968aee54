"""`cl`: parse, call, render. Library errors (CLError) become one red line and an exit code here."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from ..core.errors import CLError, NothingToDo
from ..core.settings import describe
from . import adapters as cli_adapters
from . import evaluation as cli_evaluation
from . import learn as cli_learn
from . import loop as cli_loop
from . import monitor as cli_monitor
from . import privacy as cli_privacy
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


# Command groups that live in their own modules, registered in the order `cl --help` lists them.
for _area in (cli_learn, cli_evaluation, cli_adapters, cli_privacy, cli_monitor, cli_loop, cli_serve):
    _area.register(app)


def main(argv: list[str] | None = None) -> None:
    app(args=argv, prog_name="cl")


if __name__ == "__main__":
    main()
