"""`cl` commands for the OpenAI-compatible service."""
from __future__ import annotations

import typer

from .support import console, err_console, settings_from


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `cl` app."""

    @app.command("serve")
    def serve_cmd(
        ctx: typer.Context,
        host: str | None = typer.Option(None, "--host", help="Address to bind (default serve.host: 127.0.0.1)."),
        port: int | None = typer.Option(None, "--port", help="Port (default serve.port: 8000)."),
        queue_size: int | None = typer.Option(None, "--queue-size", help="Requests waiting for the model before 503."),
        log_level: str = typer.Option("info", "--log-level", help="uvicorn log level: debug, info, warning, error."),
    ) -> None:
        """Serve the champion model over an OpenAI-compatible HTTP API (/v1/chat/completions)."""
        from ..serve.app import bind_socket, make_server
        from ..serve.schemas import is_loopback
        from ..serve.worker import Service
        from ..storage.keys import ADMIN_TOKEN_ENV

        settings = settings_from(ctx, serve={"host": host, "port": port, "queue_size": queue_size})
        cfg = settings.serve
        sock = bind_socket(cfg.host, cfg.port)  # fail fast, before the model loads, when the port is taken
        if not is_loopback(cfg.host):
            err_console.print(f"[yellow]warning: listening on {cfg.host}, not loopback: anyone who can reach this "
                              "machine can use the model and write to your logs (/v1 has no authentication)[/yellow]",
                              soft_wrap=True)
        with console.status("Loading model..."):
            service = Service.load(settings)
        token_note = ("admin API on (/admin, Bearer token)" if service.admin_token
                      else f"admin API off (set {ADMIN_TOKEN_ENV} to enable)")
        url_host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
        console.print(f"[bold]cl serve[/bold] - {service.chat.base.name} on http://{url_host}:{cfg.port}/v1 "
                      f"(queue {cfg.queue_size}, max_tokens {cfg.max_tokens}); {token_note}. Ctrl-C stops.",
                      soft_wrap=True)
        make_server(service, log_level=log_level).run(sockets=[sock])
        console.print("server stopped; every finished answer is recorded")
