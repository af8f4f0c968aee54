"""Reading a registered snapshot's files for evaluation: its conversations (sealed fields opened) and where its
held-out slice lies."""
from __future__ import annotations

from pathlib import Path

import orjson

from .. import registry
from ..core.errors import InputError
from ..core.settings import Settings
from ..storage.crypto import cipher_from_env, open_messages


def load_messages_file(path: Path) -> list[list[dict]]:
    """Conversations (messages lists ending with an assistant turn) from a snapshot's JSONL file."""
    conversations = []
    cipher = cipher_from_env()
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            messages = open_messages(orjson.loads(raw), cipher).get("messages")
        except (orjson.JSONDecodeError, AttributeError):
            raise InputError(f"{path}, line {number}: not a JSON object with 'messages'",
                             "re-run 'cl curate'") from None
        if isinstance(messages, list) and messages and messages[-1].get("role") == "assistant":
            conversations.append(messages)
    return conversations


def snapshot_eval_path(settings: Settings, snapshot: dict) -> Path | None:
    """The held-out slice of a registered snapshot (its `eval_file`), if it is on disk."""
    relative = snapshot.get("eval_file")
    if not relative:
        return None
    path = registry.confined(settings, relative)
    return path if path.is_file() else None
