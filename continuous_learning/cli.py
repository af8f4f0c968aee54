"""`cl`: parse, call, render. Library errors (CLError) become one red line and an exit code here."""
from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Any, Optional

import click
import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from .errors import CLError
from .settings import Settings, describe, load_settings

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


class _Group(TyperGroup):
    """Turns CLError (and unexpected errors) into one line + exit code, unless --debug."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CLError as exc:
            if _debug(ctx):
                raise
            err_console.print(f"[red]error:[/red] {exc.message}" + (f" [dim]({exc.hint})[/dim]" if exc.hint else ""))
            raise click.exceptions.Exit(exc.exit_code) from None
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException, KeyboardInterrupt):
            raise
        except Exception as exc:  # an unexpected failure still gets one line; the traceback is behind --debug
            if _debug(ctx):
                raise
            err_console.print(f"[red]error:[/red] {type(exc).__name__}: {exc} [dim](run with --debug for the traceback)[/dim]")
            raise click.exceptions.Exit(1) from None


def _debug(ctx: click.Context) -> bool:
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
    home: Optional[Path] = typer.Option(None, "--home", envvar="CL_HOME", help="Workspace root (default: current folder)."),
    base_model: Optional[str] = typer.Option(None, "--base-model", help="Base model: local HF folder, cached hub id or .gguf file."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    ctx.obj = {"home": home, "base_model": base_model, "debug": debug}


def settings_from(ctx: typer.Context, **sections: dict) -> Settings:
    """Settings for this command: its own flags (by section) over the root options, env, cl.toml, defaults."""
    obj = ctx.find_root().obj or {}
    overrides = {k: dict(v) for k, v in sections.items()}
    if obj.get("base_model"):
        overrides.setdefault("model", {})["base_model"] = obj["base_model"]
    return load_settings(home=obj.get("home"), overrides=overrides, debug=bool(obj.get("debug")))


def print_json(data: Any) -> None:
    import orjson

    sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")


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

# === curate / snapshots ===

# === train / eval / adapters / promote / rollback ===


def main(argv: list[str] | None = None) -> None:
    app(args=argv, prog_name="cl")


if __name__ == "__main__":
    main()
