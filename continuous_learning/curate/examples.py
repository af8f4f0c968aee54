"""`Example`: one training example as curate handles it, and how it is written to (and read from) a snapshot line."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

from ..storage.crypto import open_messages, seal_messages
from ..train import preference
from .text import clean_messages, normalise, short_hash

KIND_WEIGHTS = {"corrected": 2.0, "helpful": 1.0, "unrated": 0.5, "unhelpful": 1.0}
KIND_RANK = {"corrected": 3, "helpful": 2, "unrated": 1, "replay": 0, "unhelpful": -1}
KINDS = ("corrected", "helpful", "unrated", "replay", "unhelpful")


@dataclass
class Example:
    """One training example: a conversation whose final assistant message is the target."""

    messages: list[dict]
    kind: str
    weight: float
    source_ids: list[str]
    user_hashes: list[str]
    target_tool: str | None = None
    created_at: str = ""
    rank: tuple = ()  # larger = better rated; decides which duplicate survives (not written)
    rejected: str | None = None  # a correction's pair: the model's answer the user replaced

    @property
    def desirable(self) -> bool:
        return self.kind != "unhelpful"

    @cached_property
    def _normalised(self) -> list[tuple[str, str]]:
        """(role, normalised content) of each non-system message: id, text and prompt key all start from these,
        and normalising is the costly part of building them on a big log."""
        return [(m["role"], normalise(m["content"])) for m in self.messages if m["role"] != "system"]

    @cached_property
    def id(self) -> str:
        """Short sha256 of the normalised prompt (the dialogue before the target) and the answer."""
        return short_hash(*(f"{role}:{content}" for role, content in self._normalised))

    @property
    def prompt(self) -> str:
        return next((m["content"] for m in reversed(self.messages) if m["role"] == "user"), "")

    @cached_property
    def prompt_key(self) -> str:
        return next((content for role, content in reversed(self._normalised) if role == "user"), "")

    @property
    def text(self) -> str:
        return "\n".join(content for _, content in self._normalised)

    def absorb(self, other: Example) -> Example:
        """The better-rated of two duplicates, carrying the sources and users of both."""
        keep, drop = (self, other) if self.rank >= other.rank else (other, self)
        keep.source_ids = list(dict.fromkeys(keep.source_ids + drop.source_ids))
        keep.user_hashes = sorted(set(keep.user_hashes) | set(drop.user_hashes))
        return keep

    def to_record(self) -> dict:
        return {
            "messages": [{"role": m["role"], "content": m["content"]} for m in self.messages],
            "id": self.id,
            "source_ids": list(self.source_ids),
            "weight": float(self.weight),
            "kind": self.kind,
            "target_tool": self.target_tool,
            "user_hashes": list(self.user_hashes),
            "created_at": self.created_at,
            **preference.trl_fields(self.messages, self.desirable, self.rejected),
        }

    @classmethod
    def from_record(cls, record: Any, kind: str | None = None) -> Example | None:
        """A snapshot line back as an Example (None when it is not one)."""
        messages = clean_messages(record.get("messages")) if isinstance(record, dict) else None
        if messages is None:
            return None
        try:
            weight = float(record.get("weight", 1.0))
        except (TypeError, ValueError):
            weight = 1.0
        return cls(
            messages=messages,
            kind=kind or str(record.get("kind", "helpful")),
            weight=weight,
            source_ids=[str(s) for s in record.get("source_ids") or []],
            user_hashes=sorted({str(h) for h in record.get("user_hashes") or []}),
            target_tool=record.get("target_tool"),
            created_at=str(record.get("created_at") or ""),
            rank=(0, 0, ""),
            rejected=preference.rejected_text(record) if kind is None else None,
        )


def seal_record(record: dict, cipher) -> dict:
    """A snapshot record with its message and preference texts sealed by `cipher`."""
    return preference.seal_fields(seal_messages(record, cipher), cipher)


def open_record(record: dict, cipher) -> dict:
    """`seal_record` undone."""
    return preference.open_fields(open_messages(record, cipher), cipher)
