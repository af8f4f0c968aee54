"""The ONE way a turn is recorded: check fields -> sanitize -> record -> append -> knowledge -> metrics.

The chat, `cl ingest` and the service all call `Recorder`, so privacy and schema cannot differ between front ends.
The append is the commit point: once the line is in the log, later steps (knowledge, counters, events) only warn
when they fail, so a caller never retries (and duplicates) a turn that was stored.
"""
from __future__ import annotations

import getpass
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from ..core.errors import InputError
from ..core.records import ROLES, Feedback, FeedbackEvent, Interaction, helpful_verdict, new_id, parse_time, utc_now
from ..core.settings import PrivacyConfig, Settings
from ..storage.crypto import cipher_from_env, seal_messages
from ..storage.store import ReadReport, append_jsonl, atomic_write_json, read_json, workspace_lock
from . import fields, knowledge

log = logging.getLogger(__name__)
MAX_LINE_BYTES = 1_000_000
_CONTROL = {c: None for c in range(32) if chr(c) not in "\t\n\r"} | {0x7F: None}


@dataclass
class Turn:
    """One exchange as a front end saw it, before sanitizing."""

    messages: list[dict]
    session_id: str | None = None
    user_id: str | None = None
    feedback: Feedback = field(default_factory=Feedback)
    model: str = ""
    adapter_version: str | None = None
    target_tool: str | None = None
    language: str | None = None
    created_at: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    latency_ms: float | None = None
    truncated: bool = False
    source: str = "chat"
    ab_arm: str | None = None
    id: str | None = None  # set by front ends that hand the id out before the turn is written (the service)


def clean_text(text: str) -> str:
    """Drop NUL and other control characters that have no place in a chat log."""
    return text.translate(_CONTROL)


class Recorder:
    """Sanitizes and appends turns and feedback for one workspace."""

    def __init__(self, settings: Settings):
        from .privacy import load_salt

        self.settings = settings
        self.salt, self.salt_created = load_salt(settings.salt_file)
        self._sanitizer = None

    @property
    def sanitizer(self):
        if self._sanitizer is None:
            from .privacy import get_sanitizer

            self._sanitizer = get_sanitizer(self.settings.privacy)
        return self._sanitizer

    def user_hash(self, user_id: str | None) -> str | None:
        from .privacy import hash_user_id

        return hash_user_id(user_id, self.salt) if user_id else None

    def record_turns(self, turns: list[Turn]) -> list[Interaction]:
        """Sanitize every text of every turn (one batch), append them in one write, update knowledge and counters."""
        if not turns:
            return []
        for turn in turns:
            fields.check_turn(turn, self.settings.privacy, messages=False)
        texts = [clean_text(m["content"]) for t in turns for m in t.messages]
        texts += [clean_text(t.feedback.correction or "") for t in turns]
        texts += [clean_text(t.feedback.comment or "") for t in turns]
        results = iter(self.sanitizer.sanitize_many(texts))
        message_results = [[next(results) for _ in t.messages] for t in turns]
        correction_results = [next(results) for _ in turns]
        comment_results = [next(results) for _ in turns]
        interactions = [
            self._interaction(t, msgs, corr, comm)
            for t, msgs, corr, comm in zip(turns, message_results, correction_results, comment_results)
        ]
        cipher = cipher_from_env()
        append_jsonl(self.settings.raw_log, [seal_messages(i.to_dict(), cipher) for i in interactions])
        self._after_append(interactions)
        return interactions

    def _interaction(self, turn: Turn, messages, correction, comment) -> Interaction:
        entities = sorted({e for r in [*messages, correction, comment] for e in r.entities})
        feedback = Feedback(
            score=turn.feedback.score,
            helpful=turn.feedback.helpful,
            private=turn.feedback.private,
            correction=correction.text or None,
            comment=comment.text or None,
        )
        return Interaction(
            messages=[{"role": m["role"], "content": r.text} for m, r in zip(turn.messages, messages)],
            session_id=fields.safe_id(turn.session_id, "session_id", self.salt) or new_id(),
            user_hash=self.user_hash(turn.user_id),
            model=fields.check_label(turn.model, "model") or "",
            adapter_version=fields.safe_id(turn.adapter_version, "adapter_version", self.salt),
            target_tool=fields.check_label(turn.target_tool, "target_tool"),
            language=fields.check_label(turn.language, "language"),
            prompt_tokens=turn.prompt_tokens,
            completion_tokens=turn.completion_tokens,
            latency_ms=turn.latency_ms,
            feedback=feedback,
            pii_entities=entities,
            pii_flagged=any(r.flagged for r in [*messages, correction, comment]),
            truncated=turn.truncated,
            source=turn.source,
            ab_arm=fields.safe_id(turn.ab_arm, "ab_arm", self.salt),
            created_at=turn.created_at or utc_now(),
            id=turn.id or new_id(),
        )

    def _after_append(self, interactions: list[Interaction]) -> None:
        _after_commit("recording", lambda: self._update_derived(interactions))

    def _update_derived(self, interactions: list[Interaction]) -> None:
        patterns = self.settings.knowledge.patterns
        facts = [
            (knowledge.extract_facts([m["content"] for m in i.messages] + [i.feedback.correction or ""], patterns),
             i.created_at)
            for i in interactions
        ]
        knowledge.record_facts(self.settings.knowledge_file, self.settings.lock_dir, facts)
        update_feedback_counters(self.settings, [(None, i.feedback, i.adapter_version) for i in interactions])
        append_jsonl(
            self.settings.learning_events,
            [{"schema_version": 1, "type": "event", "id": new_id(), "created_at": utc_now(), "event": "ingested",
              "count": len(interactions), "source": interactions[0].source}],
        )

    def record_feedback(self, interaction: Interaction, feedback: Feedback, user_id: str | None = None,
                        source: str = "chat") -> FeedbackEvent:
        """Append a late rating as its own event line (the interaction line is never rewritten)."""
        validate_feedback(feedback, self.settings.privacy)
        texts = [clean_text(feedback.correction or ""), clean_text(feedback.comment or "")]
        correction, comment = self.sanitizer.sanitize_many(texts)
        clean = Feedback(score=feedback.score, helpful=feedback.helpful, private=feedback.private,
                         correction=correction.text or None, comment=comment.text or None)
        event = FeedbackEvent(interaction_id=interaction.id, feedback=clean, user_hash=self.user_hash(user_id),
                              source=source)
        append_jsonl(self.settings.raw_log, [seal_messages(event.to_dict(), cipher_from_env())])
        _after_commit("feedback", lambda: self._feedback_derived(interaction, clean, event))
        return event

    def _feedback_derived(self, interaction: Interaction, clean: Feedback, event: FeedbackEvent) -> None:
        update_feedback_counters(self.settings, [(interaction.feedback, interaction.feedback.merged(clean),
                                                  interaction.adapter_version)])
        if clean.correction:
            facts = knowledge.extract_facts([clean.correction], self.settings.knowledge.patterns)
            knowledge.record_facts(self.settings.knowledge_file, self.settings.lock_dir, [(facts, event.created_at)])


def _after_commit(what: str, step: Callable[[], None]) -> None:
    """Run a step that follows the append: its failure is logged, never raised (the line is already stored)."""
    try:
        step()
    except Exception as exc:  # noqa: BLE001 - derived files are recounted later; the caller must not retry
        log.warning("%s: stored, but updating knowledge/counters failed (%s: %s)", what, type(exc).__name__, exc)


def default_user_id() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name in some containers
        return "local"


# --- feedback counters ---------------------------------------------------------------------------------
def _bucket(feedback: Feedback | None, settings: Settings) -> str | None:
    if feedback is None:
        return None
    verdict = helpful_verdict(feedback, settings.curate.helpful_threshold, settings.curate.unhelpful_threshold)
    return "skipped" if verdict == "unrated" else verdict


def update_feedback_counters(settings: Settings, changes: list[tuple[Feedback | None, Feedback, str | None]]) -> None:
    """Counters in logs/feedback_metrics.json, kept current: each change moves one turn from its old bucket to its
    new one."""
    with workspace_lock(settings.lock_dir, "feedback_metrics", wait=30.0):
        doc = read_json(settings.feedback_metrics, default={}) or {}
        for before, after, adapter in changes:
            for scope in ("total", f"adapter:{adapter or 'base'}"):
                counts = doc.setdefault(scope, {"helpful": 0, "unhelpful": 0, "neutral": 0, "skipped": 0,
                                                "corrected": 0, "turns": 0})
                old, new = _bucket(before, settings), _bucket(after, settings)
                if old is None:
                    counts["turns"] += 1
                elif old in counts:
                    counts[old] = max(0, counts[old] - 1)
                counts[new] += 1
        doc["updated_at"] = utc_now()
        atomic_write_json(settings.feedback_metrics, doc)


def record_generation(settings: Settings, interaction_id: str, stats, model: str, adapter: str | None) -> None:
    append_jsonl(settings.generation_metrics, [{
        "schema_version": 1, "type": "generation", "id": new_id(), "created_at": utc_now(),
        "interaction_id": interaction_id, "model": model, "adapter_version": adapter,
        "prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.completion_tokens,
        "latency_ms": round(stats.latency_ms, 1),
        "first_token_ms": round(stats.first_token_ms, 1) if stats.first_token_ms is not None else None,
        "tokens_per_s": round(stats.tokens_per_s, 2), "truncated": stats.truncated,
    }])


# --- reading interactions back ---------------------------------------------------------------------
def iter_interactions(settings: Settings, report: ReadReport | None = None) -> Iterator[Interaction]:
    """Every interaction of the raw log, texts opened; records of the wrong shape are skipped and noted in
    `report` (the shared tolerant reader)."""
    from ..storage.store import read_log

    for _, record in read_log(settings.raw_log, report, cipher_from_env(), open_texts=True):
        if isinstance(record, Interaction):
            yield record


def find_interaction(settings: Settings, interaction_id: str) -> Interaction:
    """The interaction with its later feedback events merged in (the shared tolerant reader: a wrongly shaped
    line on the way is skipped, never fatal)."""
    from ..storage.store import find_joined

    found = find_joined(settings.raw_log, interaction_id, cipher_from_env())
    if found is None:
        raise InputError(f"no interaction with id {interaction_id}", "copy the id from the chat or from "
                                                                     "raw_interactions.jsonl")
    return found


# --- importing other apps' logs --------------------------------------------------------------------
def validate_feedback(feedback: Feedback, privacy: PrivacyConfig | None = None) -> None:
    """Types and length limits of a feedback; InputError naming the field (see fields.check_feedback)."""
    fields.check_feedback(feedback, privacy or PrivacyConfig())


def _text(value: Any, what: str, max_chars: int) -> str:
    if not isinstance(value, str):
        raise InputError(f"'{what}' must be a string")
    value = clean_text(value)
    if not value.strip():
        raise InputError(f"'{what}' is empty")
    if len(value) > max_chars:
        raise InputError(f"'{what}' is longer than {max_chars} characters")
    return value


def _optional_str(data: dict, key: str, max_chars: int = fields.MAX_USER_ID_CHARS) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InputError(f"'{key}' must be a string")
    if len(str(value)) > max_chars:
        raise InputError(f"'{key}' is longer than {max_chars} characters")
    return str(value)


def _label(data: dict, key: str) -> str | None:
    return fields.check_label(_optional_str(data, key), key)


def _messages(data: dict, max_chars: int) -> list[dict]:
    if "messages" in data:
        raw = data["messages"]
        if not isinstance(raw, list) or not raw:
            raise InputError("'messages' must be a non-empty list")
        messages = []
        for i, m in enumerate(raw):
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                raise InputError(f"messages[{i}] needs a role of {'/'.join(ROLES)}")
            messages.append({"role": m["role"], "content": _text(m.get("content"), f"messages[{i}].content",
                                                                 max_chars)})
        if messages[-1]["role"] != "assistant" or not any(m["role"] == "user" for m in messages):
            raise InputError("'messages' must contain a user turn and end with the assistant's answer")
        return messages
    if "prompt" in data or "response" in data:
        return [
            {"role": "user", "content": _text(data.get("prompt"), "prompt", max_chars)},
            {"role": "assistant", "content": _text(data.get("response"), "response", max_chars)},
        ]
    raise InputError("needs either 'messages' or 'prompt' and 'response'")


def _feedback(data: dict, privacy: PrivacyConfig) -> Feedback:
    raw = data.get("feedback") or {}
    if not isinstance(raw, dict):
        raise InputError("'feedback' must be an object like {\"score\": 4} or {\"helpful\": true}")
    feedback = Feedback.from_dict(raw)
    if data.get("correction") is not None:
        feedback.correction = data["correction"]
    validate_feedback(feedback, privacy)
    if feedback.correction is not None:
        feedback.correction = clean_text(feedback.correction) or None
    return feedback


def parse_ingest_line(raw: bytes, max_chars: int, max_bytes: int = MAX_LINE_BYTES,
                      privacy: PrivacyConfig | None = None) -> Turn:
    """One line of another app's log to a Turn, or InputError saying what is wrong with it (the first bad field)."""
    privacy = privacy or PrivacyConfig(max_text_chars=max_chars)
    if len(raw) > max_bytes:
        raise InputError(f"line is larger than {max_bytes} bytes")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InputError("not valid JSON (or not UTF-8)") from None
    if not isinstance(data, dict):
        raise InputError("must be a JSON object")
    created_at = _optional_str(data, "created_at")
    if created_at is not None:
        try:
            created_at = parse_time(created_at).isoformat().replace("+00:00", "Z")
        except ValueError:
            raise InputError("'created_at' is not an ISO-8601 time") from None
    return Turn(
        messages=_messages(data, max_chars),
        session_id=_optional_str(data, "session_id"),
        user_id=_optional_str(data, "user_id"),
        feedback=_feedback(data, privacy),
        target_tool=_label(data, "target_tool"),
        language=_label(data, "language"),
        created_at=created_at,
        model=_label(data, "model") or "imported",
        source="ingest",
    )


@dataclass
class IngestReport:
    imported: int = 0
    skipped: list[tuple[int, str]] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)


def _lines(path: Path, max_bytes: int) -> Iterator[tuple[int, bytes]]:
    """Lines of a file, without ever holding more than max_bytes+1 of one oversized line in memory."""
    with open(path, "rb") as handle:
        number = 0
        while True:
            line = handle.readline(max_bytes + 1)
            if not line:
                return
            number += 1
            if len(line) > max_bytes and not line.endswith(b"\n"):
                while (rest := handle.readline(1 << 20)) and not rest.endswith(b"\n"):
                    pass
                yield number, b"x" * (max_bytes + 1)
                continue
            if line.strip():
                yield number, line


def ingest_file(settings: Settings, path: Path, batch_size: int = 256,
                progress: Callable[[int], None] | None = None) -> IngestReport:
    """Import another app's JSONL log through the same sanitizer and schema; bad lines are skipped and reported."""
    if not path.is_file():
        raise InputError(f"no such file: {path}", "pass the path of a JSONL file")
    recorder = Recorder(settings)
    report, batch = IngestReport(), []
    for number, raw in _lines(path, MAX_LINE_BYTES):
        try:
            batch.append(parse_ingest_line(raw, settings.privacy.max_text_chars, privacy=settings.privacy))
        except InputError as exc:
            report.skipped.append((number, exc.message))
        if len(batch) >= batch_size:
            _flush(recorder, batch, report, progress)
    _flush(recorder, batch, report, progress)
    return report


def _flush(recorder: Recorder, batch: list[Turn], report: IngestReport, progress) -> None:
    if not batch:
        return
    for turn in batch:
        turn.session_id = turn.session_id or f"import-{new_id()}"
    recorded = recorder.record_turns(batch)
    report.imported += len(recorded)
    report.ids.extend(i.id for i in recorded)
    if progress:
        progress(len(recorded))
    batch.clear()
