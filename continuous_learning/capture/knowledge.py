"""Facts mentioned in chats (lot, batch, part identifiers by default), aggregated into knowledge/knowledge.json.

knowledge.json is derived data: every fact comes from the raw log. A damaged file is moved aside (never read as
truth, never left to block recording) and the counts start again from the next turn.
"""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path

from ..core.errors import ConfigError, InputError
from ..storage.store import atomic_write_json, read_json, workspace_lock

log = logging.getLogger(__name__)


@lru_cache(maxsize=16)
def compile_patterns(patterns: tuple[str, ...]) -> tuple[re.Pattern, ...]:
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern, re.IGNORECASE))
        except re.error as exc:
            raise ConfigError(f"knowledge pattern {pattern!r} is not a valid regex ({exc})", "fix knowledge.patterns "
                                                                                             "in cl.toml") from None
    return tuple(compiled)


def normalise_fact(text: str) -> str:
    return " ".join(text.split()).upper()


def extract_facts(texts: Iterable[str], patterns: Iterable[str]) -> list[str]:
    """Every match of every pattern, normalised (case and spacing), in order of appearance, unique."""
    seen: dict[str, None] = {}
    for text in texts:
        for regex in compile_patterns(tuple(patterns)):
            for match in regex.finditer(text):
                seen.setdefault(normalise_fact(match.group(0)), None)
    return list(seen)


def merge_facts(doc: dict, facts: Iterable[str], seen_at: str) -> dict:
    """Pure: count each fact once more and move its last-seen time."""
    entries = doc.setdefault("facts", {})
    for fact in facts:
        entry = entries.setdefault(fact, {"fact": fact, "count": 0, "first_seen": seen_at, "last_seen": seen_at})
        entry["count"] += 1
        entry["first_seen"] = min(entry["first_seen"], seen_at)
        entry["last_seen"] = max(entry["last_seen"], seen_at)
    return doc


def record_facts(path: Path, lock_dir: Path, facts_by_time: list[tuple[list[str], str]]) -> None:
    """Read-modify-write knowledge.json under a lock, atomically."""
    if not any(facts for facts, _ in facts_by_time):
        return
    with workspace_lock(lock_dir, "knowledge", wait=30.0):
        doc = _readable_doc(path)
        for facts, seen_at in facts_by_time:
            merge_facts(doc, facts, seen_at)
        atomic_write_json(path, doc)


def _readable_doc(path: Path) -> dict:
    """The knowledge document, or a fresh one after moving a damaged file aside (kept for inspection)."""
    try:
        doc = read_json(path, default={"facts": {}})
    except InputError:
        doc = None
    if _well_formed(doc):
        return doc
    aside = path.with_name(f"{path.name}.damaged-{datetime.now(UTC):%Y%m%dT%H%M%S%fZ}")
    os.replace(path, aside)
    log.warning("%s was damaged; moved it to %s and started the fact counts again", path, aside.name)
    return {"facts": {}}


def _well_formed(doc: object) -> bool:
    if not isinstance(doc, dict) or not isinstance(doc.get("facts", {}), dict):
        return False
    return all(
        isinstance(entry, dict) and isinstance(entry.get("count"), int) and isinstance(entry.get("first_seen"), str)
        and isinstance(entry.get("last_seen"), str)
        for entry in doc.get("facts", {}).values()
    )


def load_facts(path: Path) -> list[dict]:
    doc = read_json(path, default={"facts": {}})
    if not _well_formed(doc):
        raise InputError(f"{path} is damaged", "delete it: the counts start again with the next recorded turn")
    return sorted(doc.get("facts", {}).values(), key=lambda e: (-e["count"], e["fact"]))
