"""The `cl` command (Typer): parse, call one library function, render. `app` holds the commands and the error
rendering; `loop`, `monitor` and `serve` register their command groups on it; `support` has the consoles and the
settings builder. The top floor: nothing imports it. Heavy libraries are imported inside the commands only."""
from .app import app, main

__all__ = ["app", "main"]
