"""The `cl` command (Typer): parse, call one library function, render. `app` holds the root options, the error
rendering and the capture commands (config, chat, ingest, feedback, knowledge); each other module registers its
commands on it: `learn` (curate, snapshots, train, through `run_loop`), `evaluation` (eval, promote, rollback),
`adapters`, `privacy` (forget, retention, export), `monitor`, `loop` (A/B, health, cycle, schedule) and `serve`.
`progress` renders a running loop's events; `support` has the consoles and the settings builder. The top floor:
nothing imports it. Heavy libraries are imported inside the commands only."""
from .app import app, main

__all__ = ["app", "main"]
