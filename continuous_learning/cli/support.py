"""What every `cl` command module shares: the consoles, settings from flags, JSON output."""
from __future__ import annotations

import sys
from typing import Any

import typer
from rich.console import Console

from ..core.settings import Settings, load_settings

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def settings_from(ctx: typer.Context, **sections: dict) -> Settings:
    """Settings for this command: its own flags (by section) over the root options, env, cl.toml, defaults."""
    obj = ctx.find_root().obj or {}
    overrides = {k: dict(v) for k, v in sections.items()}
    if obj.get("base_model"):
        overrides.setdefault("model", {})["base_model"] = obj["base_model"]
    return load_settings(home=obj.get("home"), overrides=overrides, debug=bool(obj.get("debug")))


def print_json(data: Any) -> None:
    import orjson

    sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS).decode() + "\n")
