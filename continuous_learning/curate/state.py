"""What the stages of the chain pass along: `Pool` (the run's pooled examples and what each stage decided about
them) and `CurateContext` (the settings, options and pass-1 results of the run, fixed before the first stage)."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ..core.settings import CurateConfig, Settings
from .cursor import Cursor, Watermark
from .examples import Example
from .feedback import FeedbackScan
from .pool import ExamplePool
from .progress import Progress
from .selection import Rules


@dataclass(frozen=True)
class CurateContext:
    """One run's inputs, resolved once: every stage reads them, none changes them."""

    settings: Settings
    doc: dict  # the registry document read under the curate lock
    scan: FeedbackScan
    cursor: Cursor  # where the previous snapshot stopped (empty for a full run)
    already: set[str]  # late-rated interactions already in a snapshot
    rules: Rules
    full: bool
    note: str | None
    progress: Progress | None
    now: datetime

    @property
    def config(self) -> CurateConfig:
        return self.settings.curate

    @property
    def snapshots(self) -> list[dict]:
        return self.doc["snapshots"]

    def report(self, phase: str, done: int, total: int | None) -> None:
        if self.progress:
            self.progress(phase, done, total)


@dataclass(frozen=True)
class Pool:
    """The pooled examples and the rows (numpy indexes into them) each stage kept; a stage returns a new Pool.

    `rows` are the rows still in play: after the domain cap they are the snapshot's new examples. A stage that
    ends the run sets `result` (the manifest to return), and the chain stops there."""

    examples: ExamplePool
    rows: Any = None
    tally: Counter = field(default_factory=Counter)  # what pass 2 saw and dropped, by reason
    watermark: Watermark = field(default_factory=Watermark)  # the newest interaction pass 2 saw
    exact: int = 0  # collapsed as exact duplicates
    near: int = 0  # collapsed as near duplicates
    capped: Any = None  # rows held back by the domain cap
    train: Any = None
    held: Any = None  # the eval rows
    replay: list[Example] = field(default_factory=list)
    manifest: dict | None = None  # built once the counts are known
    result: dict | None = None
