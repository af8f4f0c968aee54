"""`cl` commands for status, report and drift."""
from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `cl` app."""
