"""Progress reports of the long passes: the callback's shape, how often it is called, and the log's line total."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

PROGRESS_EVERY = 4096

Progress = Callable[[str, int, int | None], None]


def count_lines(path: Path) -> int:
    """Newlines in the file, read in blocks (for a progress total; cheap next to parsing)."""
    if not path.exists():
        return 0
    with open(path, "rb") as handle:
        return sum(block.count(b"\n") for block in iter(lambda: handle.read(1 << 20), b""))


def ticker(progress: Progress | None, phase: str, total: int | None) -> Callable[[int, bool], None]:
    """`tick(done, final)`: reports `phase` every PROGRESS_EVERY lines and when final; reports 0 lines at once."""

    def tick(done: int, final: bool = False) -> None:
        if progress and (final or done % PROGRESS_EVERY == 0):
            progress(phase, done, total)

    tick(0, True)
    return tick

