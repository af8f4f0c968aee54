"""Record types written to the JSONL logs, and the join of late feedback onto interactions.

Every record carries `schema_version`, `type`, an `id` and UTC ISO-8601 timestamps. Logs are append-only:
feedback that arrives after a turn is its own `feedback` line, joined by `interaction_id` when read.
"""
from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

SCHEMA_VERSION = 1
INTERACTION = "interaction"
FEEDBACK = "feedback"
ROLES = ("system", "user", "assistant")


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(text: str) -> datetime:
    """ISO-8601 to an aware UTC datetime (naive times are taken as UTC)."""
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def new_id() -> str:
    return str(uuid.uuid4())


@dataclass
class Feedback:
    """A user's judgement of one answer. Any field may be missing; later events override earlier ones."""

    score: int | None = None  # 1-5
    helpful: bool | None = None  # y/n
    comment: str | None = None
    correction: str | None = None  # the answer the model should have given
    private: bool | None = None  # the user asked that this turn never be trained on

    def is_empty(self) -> bool:
        return all(v is None for v in asdict(self).values())

    def merged(self, later: "Feedback") -> "Feedback":
        mine, theirs = asdict(self), asdict(later)
        return Feedback(**{k: theirs[k] if theirs[k] is not None else mine[k] for k in mine})

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict | None) -> "Feedback":
        data = data or {}
        return cls(**{k: data.get(k) for k in ("score", "helpful", "comment", "correction", "private")})


@dataclass
class Interaction:
    messages: list[dict]  # sanitized [{"role", "content"}], ending with the assistant answer
    session_id: str
    user_hash: str | None = None
    model: str = ""
    adapter_version: str | None = None
    target_tool: str | None = None
    language: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    latency_ms: float | None = None
    feedback: Feedback = field(default_factory=Feedback)
    pii_entities: list[str] = field(default_factory=list)  # entity types redacted from this turn
    pii_flagged: bool = False  # a likely entity could not be redacted with confidence
    truncated: bool = False  # generation stopped at the token limit or was interrupted
    source: str = "chat"
    ab_arm: str | None = None
    id: str = field(default_factory=new_id)
    created_at: str = field(default_factory=utc_now)
    recorded_at: str = field(default_factory=utc_now)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["feedback"] = self.feedback.to_dict()
        return {"schema_version": SCHEMA_VERSION, "type": INTERACTION, **data}

    @classmethod
    def from_dict(cls, data: dict) -> "Interaction":
        known = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in data.items() if k in known}
        values["feedback"] = Feedback.from_dict(data.get("feedback"))
        messages = values.get("messages")
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
        ):
            raise ValueError("messages must be a list of {role, content} strings")
        return cls(**values)

    @property
    def prompt(self) -> str:
        return next((m["content"] for m in reversed(self.messages) if m["role"] == "user"), "")

    @property
    def answer(self) -> str:
        return self.messages[-1]["content"] if self.messages and self.messages[-1]["role"] == "assistant" else ""


@dataclass
class FeedbackEvent:
    interaction_id: str
    feedback: Feedback
    user_hash: str | None = None
    source: str = "chat"
    id: str = field(default_factory=new_id)
    created_at: str = field(default_factory=utc_now)

    def to_dict(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "type": FEEDBACK,
            "id": self.id,
            "created_at": self.created_at,
            "interaction_id": self.interaction_id,
            "user_hash": self.user_hash,
            "source": self.source,
            "feedback": self.feedback.to_dict(),
        }


def learning_event(kind: str, **details: Any) -> dict:
    return {"schema_version": SCHEMA_VERSION, "type": "event", "id": new_id(), "created_at": utc_now(), "event": kind, **details}


def helpful_verdict(feedback: Feedback, helpful_threshold: int = 4, unhelpful_threshold: int = 2) -> str:
    """'corrected', 'helpful', 'unhelpful', 'neutral' or 'unrated' for one joined feedback."""
    if feedback.correction:
        return "corrected"
    if feedback.score is not None:
        if feedback.score >= helpful_threshold:
            return "helpful"
        if feedback.score <= unhelpful_threshold:
            return "unhelpful"
        return "neutral"
    if feedback.helpful is True:
        return "helpful"
    if feedback.helpful is False:
        return "unhelpful"
    return "unrated"
