"""The incremental cursor: where the previous snapshot stopped, and the watermark a run keeps to write the next."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cached_property
from typing import Any

from ..core.records import parse_time

# Records are stamped before they are appended, so two writers can land slightly out of order, and a batch
# import stamps many records with the same millisecond. The cursor remembers the ids seen in this window.
CURSOR_SLACK = timedelta(seconds=5)


def moment_of(text: Any) -> datetime | None:
    """The time a record's stamp names; None when it is not a readable one."""
    try:
        return parse_time(text) if isinstance(text, str) else None
    except ValueError:
        return None


@dataclass
class Cursor:
    """Where the previous snapshot stopped: the newest interaction and feedback event it saw (by
    `recorded_at` / event `created_at`), the ids seen within CURSOR_SLACK of each, and the turns its domain
    cap held back (so a flooding domain is spread over snapshots, not lost)."""

    recorded_at: str | None = None
    recorded_ids: list[str] = field(default_factory=list)
    feedback_at: str | None = None
    feedback_ids: list[str] = field(default_factory=list)
    last_interaction_id: str | None = None  # the newest interaction included in the snapshot
    deferred_ids: list[str] = field(default_factory=list)  # capped turns, offered again with the next new material

    @classmethod
    def from_dict(cls, data: Any) -> Cursor:
        if not isinstance(data, dict):
            return cls()
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @cached_property
    def _edges(self) -> tuple:
        return moment_of(self.recorded_at), set(self.recorded_ids), moment_of(self.feedback_at), set(self.feedback_ids)

    def new_interaction(self, moment: datetime, ident: str) -> bool:
        top, edge, _, _ = self._edges
        return _after(moment, ident, top, edge)

    def new_feedback(self, moment: datetime, ident: str) -> bool:
        _, _, top, edge = self._edges
        return _after(moment, ident, top, edge)


def _after(moment: datetime, ident: str, top: datetime | None, edge: set[str]) -> bool:
    if top is None or moment > top:
        return True
    return moment > top - CURSOR_SLACK and ident not in edge


class Watermark:
    """The newest timestamp seen, and the ids seen within CURSOR_SLACK of it."""

    def __init__(self) -> None:
        self.top: datetime | None = None
        self.top_text: str | None = None
        self._recent: list[tuple[datetime, str]] = []
        self._pruned_at = 0

    def see(self, moment: datetime, text: str, ident: str) -> None:
        if self.top is None or moment > self.top:
            self.top, self.top_text = moment, text
        if moment > self.top - CURSOR_SLACK:
            self._recent.append((moment, ident))
            if len(self._recent) > max(1024, 2 * self._pruned_at):
                self._prune()

    def _prune(self) -> None:
        if self.top is not None:
            self._recent = [(m, i) for m, i in self._recent if m > self.top - CURSOR_SLACK]
        self._pruned_at = len(self._recent)

    def edge(self) -> list[str]:
        self._prune()
        return sorted({i for _, i in self._recent})


def previous_cursor(snapshots: list[dict]) -> Cursor:
    return Cursor.from_dict(snapshots[-1].get("cursor")) if snapshots else Cursor()

