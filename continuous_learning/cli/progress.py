"""How a running loop looks in the terminal: the `Events` of `run_loop` rendered with rich on stderr."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rich.markup import escape

from ..loop.workflow import CURATE, EVAL, TRAIN, NoEvents
from .support import err_console


def dim_line(message: str) -> None:
    err_console.print(f"[dim]{escape(message)}[/dim]")


class StageBars:
    """Rich progress bars on stderr, one per curate phase, fed by `update(phase, done, total)`."""

    def __init__(self, enabled: bool):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                             console=err_console, transient=True, disable=not enabled)
        self._tasks: dict[str, Any] = {}

    def __enter__(self):
        self._bar.__enter__()
        return self.update

    def __exit__(self, *exc: Any) -> None:
        self._bar.__exit__(*exc)

    def update(self, phase: str, done: int, total: int | None) -> None:
        if phase not in self._tasks:
            self._tasks[phase] = self._bar.add_task(phase, total=total)
        self._bar.update(self._tasks[phase], completed=done, total=total)


class TrainingBar:
    """One bar for a training run: steps, loss, tokens/s and ETA."""

    def __init__(self, enabled: bool):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
                            TextColumn("ETA {task.fields[eta]}"), TimeElapsedColumn(), console=err_console,
                            disable=not enabled)
        self.task = self.bar.add_task("train", total=None, loss="-", tps="-", eta="-")

    def __enter__(self) -> TrainingBar:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.__exit__(*exc)

    def update(self, done: int, total: int | None, event: dict) -> None:
        if event.get("event") != "step":
            self.bar.update(self.task, completed=done, total=total)
            return
        eta = int(event.get("eta_s") or 0)
        self.bar.update(self.task, completed=done, total=total, loss=f"{event['loss']:.3f}",
                        tps=f"{event['tokens_per_s']:.0f}", eta=f"{eta // 60}:{eta % 60:02d}")


class LoopDisplay(NoEvents):
    """Bars while curate and training run, dim status lines, warnings; `show(stage, result)` prints each stage's
    result as soon as it is done. Quiet (--json): no bars and no status lines, only warnings."""

    def __init__(self, quiet: bool, show: Callable[[str, dict], None] | None = None):
        self.quiet = quiet
        self.show = show
        self.seconds: dict[str, float] = {}
        self._curate: StageBars | None = None
        self._curate_update: Callable[[str, int, int | None], None] | None = None
        self._train: TrainingBar | None = None

    def __enter__(self) -> LoopDisplay:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._close(*exc)

    def _close(self, *exc: Any) -> None:
        for bar in (self._curate, self._train):
            if bar is not None:
                bar.__exit__(*(exc or (None, None, None)))
        self._curate = self._train = None

    def started(self, stage: str) -> None:
        if stage == CURATE:
            self._curate = StageBars(enabled=not self.quiet)
            self._curate_update = self._curate.__enter__()
        elif stage == TRAIN:
            self._train = TrainingBar(enabled=not self.quiet).__enter__()

    def progress(self, stage: str, done: int, total: int | None, detail: dict) -> None:
        if stage == CURATE and self._curate_update is not None:
            self._curate_update(detail["phase"], done, total)
        elif stage == TRAIN and self._train is not None:
            self._train.update(done, total, detail)

    def status(self, stage: str, message: str) -> None:
        if self.quiet:
            return
        if stage == TRAIN and self._train is not None:
            self._train.bar.console.print(f"[dim]{message}[/dim]")
        elif stage == EVAL:
            dim_line(message)

    def warning(self, stage: str, message: str) -> None:
        err_console.print(f"[yellow]warning:[/yellow] {message}")

    def finished(self, stage: str, result: dict, seconds: float) -> None:
        self._close()
        self.seconds[stage] = seconds
        if self.show is not None and not self.quiet:
            self.show(stage, result)
