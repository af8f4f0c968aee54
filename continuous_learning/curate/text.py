"""The text forms curate compares: normalised text, short ids, character shingles and their Jaccard similarity."""
from __future__ import annotations

import hashlib
import re
import sys
import unicodedata
from typing import Any

from ..core.records import ROLES

SHINGLE_CHARS = 5
ID_CHARS = 16

_SPACES = re.compile(r"\s+")


def normalise(text: str) -> str:
    """Unicode NFKC, case-folded, whitespace collapsed: the form duplicates are compared in."""
    return _SPACES.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def short_hash(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()[:ID_CHARS]


def shingles(text: str, size: int = SHINGLE_CHARS) -> set[str]:
    return {text[i : i + size] for i in range(max(1, len(text) - size + 1))}


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


_ROLE_NAMES = {role: role for role in ROLES}  # one shared string per role, not one per parsed message


def clean_messages(messages: Any) -> list[dict] | None:
    """[{"role", "content"}] ending with the assistant answer, or None when the shape is wrong."""
    if not isinstance(messages, list) or not messages:
        return None
    out = []
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in ROLES \
                or not isinstance(message.get("content"), str):
            return None
        role, content = _ROLE_NAMES[message["role"]], message["content"]
        out.append({"role": role, "content": sys.intern(content) if role == "system" else content})
    return out if out[-1]["role"] == "assistant" else None


