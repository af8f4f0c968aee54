"""Streaming rewrites for `forget` and `retention`, prepared first and committed together.

`prepare_rewrite` streams a JSONL file into a temp file beside it, keeping the records a predicate keeps. It never
holds a line whole beyond MAX_RECORD_BYTES: an over-long line is skipped in chunks. Lines that are not JSON
objects (a torn tail, garbage, a line of another shape) cannot be attributed to anyone, may hold anyone's text,
and are removed too (counted as `damaged`). Nothing is renamed until `commit()`, so every check and every
decryption happens before the first file changes.

`Recount` rebuilds what is derived from the raw log (the feedback counters, knowledge.json, the set of ids still
present) from the lines a rewrite keeps, through the shared tolerant parser: a wrongly shaped line is skipped, it
can never make a recount fail after the log was rewritten.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from ..core.errors import CLError
from ..core.records import BadRecord, Feedback, FeedbackEvent, Interaction, helpful_verdict, parse_log_record, utc_now
from ..core.settings import Settings
from ..storage.crypto import open_messages
from ..storage.store import (
    MAX_RECORD_BYTES,
    atomic_write_json,
    bounded_lines,
    fsync_dir,
    read_json,
    temp_file,
    workspace_lock,
)
from . import knowledge

BUCKETS = ("helpful", "unhelpful", "neutral", "skipped", "corrected", "turns")


@dataclass
class Rewrite:
    """A prepared rewrite of one file: what was kept and dropped, and the temp file holding the result."""

    path: Path
    tmp: Path | None = None
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    dropped_ids: set[str] = field(default_factory=set)
    damaged: int = 0
    sha256: str = hashlib.sha256(b"").hexdigest()
    users: set[str] = field(default_factory=set)

    @property
    def total_dropped(self) -> int:
        return sum(self.dropped.values())

    @property
    def changed(self) -> bool:
        return bool(self.total_dropped or self.damaged)

    def commit(self) -> None:
        """Rename the temp file over the original when anything was removed; otherwise leave the original."""
        if self.tmp is None:
            return
        if self.changed:
            os.replace(self.tmp, self.path)
            fsync_dir(self.path.parent)
        else:
            self.tmp.unlink(missing_ok=True)
        self.tmp = None

    def discard(self) -> None:
        if self.tmp is not None:
            self.tmp.unlink(missing_ok=True)
            self.tmp = None


def _record(raw: bytes) -> dict | None:
    try:
        record = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def prepare_rewrite(path: Path, keep: Callable[[dict], bool], seen: Callable[[dict], None] | None = None,
                    max_line_bytes: int = MAX_RECORD_BYTES) -> Rewrite:
    """Stream `path` into a temp file without the records `keep` refuses and without damaged lines; `seen` is
    called with every record kept. Nothing replaces the original until `commit()`."""
    result = Rewrite(path)
    if not path.exists():
        return result
    digest = hashlib.sha256()
    fd, name = temp_file(path)
    result.tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as out, open(path, "rb") as source:
            for _, raw in bounded_lines(source, max_line_bytes):
                record = _record(raw) if raw is not None else None
                if record is None:
                    result.damaged += 1 if raw is None or raw.strip() else 0
                    continue
                if not keep(record):
                    result.dropped[str(record.get("type") or "example")] += 1
                    result.dropped_ids.add(str(record.get("id")))
                    continue
                line = raw if raw.endswith(b"\n") else raw + b"\n"
                out.write(line)
                digest.update(line)
                result.kept += 1
                result.users.update(str(h) for h in record.get("user_hashes") or [] if isinstance(h, str))
                if seen is not None:
                    seen(record)
            out.flush()
            os.fsync(out.fileno())
    except OSError as exc:
        result.discard()
        raise CLError(f"cannot rewrite {path}: {exc.strerror or exc}",
                      "free space or fix permissions and run it again; the original file is unchanged") from None
    except BaseException:
        result.discard()
        raise
    result.sha256 = digest.hexdigest()
    return result


@contextlib.contextmanager
def prepared(*rewrites: Rewrite):
    """Discard every temp file that was not committed (an error, a kill of the block)."""
    try:
        yield
    finally:
        for rewrite in rewrites:
            rewrite.discard()


class Recount:
    """Counters, knowledge facts and present ids, rebuilt from the raw-log lines a rewrite keeps."""

    def __init__(self, settings: Settings, cipher, watched_ids: set[str] | None = None):
        self.settings, self.cipher = settings, cipher
        self.latest: dict[str, tuple[str | None, Feedback]] = {}  # interaction id -> (adapter, merged feedback)
        self.facts: dict = {"facts": {}}
        self.watched = watched_ids or set()
        self.present_watched: set[str] = set()
        self.skipped = 0

    def add(self, raw: dict) -> None:
        try:
            record = parse_log_record(open_messages(raw, self.cipher))  # a wrong key raises: nothing committed yet
        except BadRecord:
            self.skipped += 1
            return
        if record is None:
            return
        if record.id in self.watched:
            self.present_watched.add(record.id)
        if isinstance(record, Interaction):
            self._interaction(record)
        elif isinstance(record, FeedbackEvent):
            self._feedback(record)

    def _interaction(self, record: Interaction) -> None:
        self.latest[record.id] = (record.adapter_version, record.feedback)
        texts = [m["content"] for m in record.messages] + [record.feedback.correction or ""]
        knowledge.merge_facts(self.facts, knowledge.extract_facts(texts, self.settings.knowledge.patterns),
                              record.created_at)

    def _feedback(self, record: FeedbackEvent) -> None:
        if record.interaction_id in self.latest:
            adapter, before = self.latest[record.interaction_id]
            self.latest[record.interaction_id] = (adapter, before.merged(record.feedback))
        if record.feedback.correction:
            facts = knowledge.extract_facts([record.feedback.correction], self.settings.knowledge.patterns)
            knowledge.merge_facts(self.facts, facts, record.created_at)

    def counters(self) -> dict:
        curate = self.settings.curate
        doc: dict = {}
        for adapter, feedback in self.latest.values():
            verdict = helpful_verdict(feedback, curate.helpful_threshold, curate.unhelpful_threshold)
            for scope in ("total", f"adapter:{adapter or 'base'}"):
                counts = doc.setdefault(scope, dict.fromkeys(BUCKETS, 0))
                counts["turns"] += 1
                counts["skipped" if verdict == "unrated" else verdict] += 1
        return doc

    def write(self) -> None:
        """Write the counters and knowledge.json, each only when its content changed."""
        with workspace_lock(self.settings.lock_dir, "feedback_metrics", wait=30.0):
            old = read_json(self.settings.feedback_metrics, default={}) or {}
            new = self.counters()
            if {k: v for k, v in old.items() if k != "updated_at"} != new:
                atomic_write_json(self.settings.feedback_metrics, {**new, "updated_at": utc_now()})
        with workspace_lock(self.settings.lock_dir, "knowledge", wait=30.0):
            try:
                old = read_json(self.settings.knowledge_file, default={"facts": {}})
            except CLError:
                old = None  # a damaged knowledge.json is replaced by the recount
            if old != self.facts:
                atomic_write_json(self.settings.knowledge_file, self.facts)
