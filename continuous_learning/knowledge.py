"""Facts mentioned in chats (lot, batch, part identifiers by default), aggregated into knowledge/knowledge.json."""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Iterable

from .errors import ConfigError
from .store import atomic_write_json, read_json, workspace_lock


@lru_cache(maxsize=16)
def compile_patterns(patterns: tuple[str, ...]) -> tuple[re.Pattern, ...]:
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern, re.IGNORECASE))
        except re.error as exc:
            raise ConfigError(f"knowledge pattern {pattern!r} is not a valid regex ({exc})", "fix knowledge.patterns in cl.toml") from None
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
        doc = read_json(path, default={"facts": {}})
        for facts, seen_at in facts_by_time:
            merge_facts(doc, facts, seen_at)
        atomic_write_json(path, doc)


def load_facts(path: Path) -> list[dict]:
    doc = read_json(path, default={"facts": {}})
    return sorted(doc.get("facts", {}).values(), key=lambda e: (-e["count"], e["fact"]))
