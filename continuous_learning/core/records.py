"""Record types written to the JSONL logs, and the join of late feedback onto interactions.

Every record carries `schema_version`, `type`, an `id` and UTC ISO-8601 timestamps. Logs are append-only:
feedback that arrives after a turn is its own `feedback` line, joined by `interaction_id` when read.
"""
from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

SCHEMA_VERSION = 1
INTERACTION = "interaction"
FEEDBACK = "feedback"
ROLES = ("system", "user", "assistant")


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(text: str) -> datetime:
    """ISO-8601 to an aware UTC datetime (naive times are taken as UTC)."""
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


class BadRecord(ValueError):
    """A stored record of the wrong shape. The message names the field, so readers can count and report it."""


# --- field checks for the ONE tolerant parser (every reader of the logs goes through it) ------------------
_MISSING = object()


def _get(data: dict, name: str, check, default: Any = None, where: str = "") -> Any:
    value = data.get(name, _MISSING)
    if value is _MISSING or value is None:
        return default
    if not check(value):
        raise BadRecord(f"field '{where}{name}' has the wrong type ({type(value).__name__}: {str(value)[:40]!r})")
    return value


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool)


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _required_str(data: dict, name: str) -> str:
    value = data.get(name)
    if not isinstance(value, str) or not value:
        raise BadRecord(f"field '{name}' must be a non-empty string (got {type(value).__name__})")
    return value


def _time_text(data: dict, name: str) -> str:
    value = data.get(name)
    if not isinstance(value, str):
        raise BadRecord(f"field '{name}' must be an ISO-8601 time string (got {type(value).__name__})")
    try:
        parse_time(value)
    except ValueError:
        raise BadRecord(f"field '{name}' is not an ISO-8601 time ({value[:40]!r})") from None
    return value


def _optional_time_text(data: dict, name: str) -> str | None:
    return None if data.get(name) is None else _time_text(data, name)


def _messages(value: Any) -> list[dict]:
    if not isinstance(value, list) or not all(
        isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in value
    ):
        raise BadRecord("field 'messages' must be a list of {role, content} strings")
    return value


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

    def merged(self, later: Feedback) -> Feedback:
        mine, theirs = asdict(self), asdict(later)
        return Feedback(**{k: theirs[k] if theirs[k] is not None else mine[k] for k in mine})

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict | None) -> Feedback:
        """As given, unchecked (input parsing validates afterwards). Stored records go through `parse`."""
        data = data or {}
        return cls(**{k: data.get(k) for k in ("score", "helpful", "comment", "correction", "private")})

    @classmethod
    def parse(cls, data: Any, where: str = "feedback") -> Feedback:
        """A stored feedback object, checked field by field; BadRecord names the first wrong one."""
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise BadRecord(f"field '{where}' must be an object (got {type(data).__name__})")
        score = _get(data, "score", _is_int, where=f"{where}.")
        if score is not None and not 1 <= score <= 5:
            raise BadRecord(f"field '{where}.score' must be 1-5 (got {score})")
        return cls(score=score, helpful=_get(data, "helpful", _is_bool, where=f"{where}."),
                   comment=_get(data, "comment", _is_str, where=f"{where}."),
                   correction=_get(data, "correction", _is_str, where=f"{where}."),
                   private=_get(data, "private", _is_bool, where=f"{where}."))


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
    def from_dict(cls, data: Any) -> Interaction:
        """A stored interaction, every field checked; BadRecord (a ValueError) names the first wrong one."""
        if not isinstance(data, dict):
            raise BadRecord(f"an interaction must be a JSON object (got {type(data).__name__})")
        created_at = _time_text(data, "created_at")
        return cls(
            messages=_messages(data.get("messages")), session_id=_get(data, "session_id", _is_str, ""),
            user_hash=_get(data, "user_hash", _is_str), model=_get(data, "model", _is_str, ""),
            adapter_version=_get(data, "adapter_version", _is_str), target_tool=_get(data, "target_tool", _is_str),
            language=_get(data, "language", _is_str), prompt_tokens=_get(data, "prompt_tokens", _is_int),
            completion_tokens=_get(data, "completion_tokens", _is_int), latency_ms=_get(data, "latency_ms", _is_number),
            feedback=Feedback.parse(data.get("feedback")),
            pii_entities=list(_get(data, "pii_entities", _is_str_list, [])),
            pii_flagged=_get(data, "pii_flagged", _is_bool, False), truncated=_get(data, "truncated", _is_bool, False),
            source=_get(data, "source", _is_str, "chat"), ab_arm=_get(data, "ab_arm", _is_str),
            id=_required_str(data, "id"), created_at=created_at,
            recorded_at=_optional_time_text(data, "recorded_at") or created_at,
        )

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

    @classmethod
    def from_dict(cls, data: Any) -> FeedbackEvent:
        """A stored feedback event, every field checked; BadRecord names the first wrong one."""
        if not isinstance(data, dict):
            raise BadRecord(f"a feedback event must be a JSON object (got {type(data).__name__})")
        if data.get("feedback") is None:
            raise BadRecord("field 'feedback' is missing")
        return cls(interaction_id=_required_str(data, "interaction_id"), feedback=Feedback.parse(data.get("feedback")),
                   user_hash=_get(data, "user_hash", _is_str), source=_get(data, "source", _is_str, "chat"),
                   id=_required_str(data, "id"), created_at=_time_text(data, "created_at"))


def parse_log_record(data: Any) -> Interaction | FeedbackEvent | None:
    """The ONE parser of raw-log lines: an Interaction, a FeedbackEvent, None for other kinds of line (events),
    or BadRecord naming what is wrong. Every reader (status, drift, report, A/B, health, forget, retention,
    export) goes through it, so none can accept what another rejects."""
    if not isinstance(data, dict):
        raise BadRecord(f"a log line must be a JSON object (got {type(data).__name__})")
    kind = data.get("type")
    if kind == INTERACTION:
        return Interaction.from_dict(data)
    if kind == FEEDBACK:
        return FeedbackEvent.from_dict(data)
    if kind is None or not isinstance(kind, str):
        raise BadRecord("field 'type' is missing or not a string")
    return None


def learning_event(kind: str, **details: Any) -> dict:
    return {"schema_version": SCHEMA_VERSION, "type": "event", "id": new_id(), "created_at": utc_now(), "event": kind,
            **details}


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
