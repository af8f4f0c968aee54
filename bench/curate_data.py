"""Synthetic raw logs for the curate benchmark: interaction and feedback lines in the exact record format
(`records.Interaction.to_dict()`, `records.FeedbackEvent.to_dict()`), already sanitized, written with orjson and
cached by size so reruns are fast."""
from __future__ import annotations

import random
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import orjson

from .common import CACHE_DIR

FORMAT_VERSION = 2  # bump when the generator changes, so stale cached files are not reused
TOOLS = [None, None, "maintenance", "quality", "safety", "scheduling"]
OPENERS = ["How do I", "What is the best way to", "Why does the line", "Can you explain how to", "Is it safe to",
           "what happens if we", "Give me steps to", "When should we"]


def _vocabulary(rng: random.Random, size: int = 4000) -> list[str]:
    syllables = ["ka", "lo", "mi", "ten", "ra", "vel", "do", "sun", "tor", "pe", "ni", "gar", "bu", "sel", "on", "fi"]
    return ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(size)]


def _sentence(rng: random.Random, words: list[str], low: int, high: int) -> str:
    return " ".join(rng.choice(words) for _ in range(rng.randint(low, high)))


def raw_log(interactions: int, seed: int = 0) -> Path:
    """The cached log with `interactions` turns (plus their feedback events); generated on first use."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    path = CACHE_DIR / f"raw_{interactions}_v{FORMAT_VERSION}_s{seed}.jsonl"
    if not path.exists():
        tmp = path.with_suffix(".partial")
        with open(tmp, "wb") as handle:
            for chunk in _lines(interactions, seed):
                handle.write(chunk)
        tmp.replace(path)
    return path


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _lines(interactions: int, seed: int):
    """Mostly distinct turns; about 5% repeat an earlier turn exactly and 10% with one word changed."""
    rng = random.Random(seed)
    words = _vocabulary(rng)
    start = datetime(2026, 6, 1, tzinfo=timezone.utc)
    users = [f"{rng.getrandbits(256):064x}" for _ in range(500)]
    recent: list[tuple[str, str]] = []
    batch: list[bytes] = []
    for i in range(interactions):
        moment = start + timedelta(milliseconds=250 * i)
        roll = rng.random()
        if recent and roll < 0.05:
            prompt, answer = rng.choice(recent)
        elif recent and roll < 0.15:
            prompt, answer = rng.choice(recent)
            answer = answer.rsplit(" ", 1)[0] + " " + rng.choice(words)
        else:
            prompt = f"{rng.choice(OPENERS)} {_sentence(rng, words, 5, 12)}?"
            answer = f"{_sentence(rng, words, 12, 40).capitalize()}. {_sentence(rng, words, 5, 20).capitalize()}."
        if len(recent) < 2000:
            recent.append((prompt, answer))
        else:
            recent[rng.randrange(2000)] = (prompt, answer)
        ident = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        user = rng.choice(users)
        stamp = _iso(moment)
        record = {
            "schema_version": 1, "type": "interaction",
            "messages": [{"role": "system", "content": "You are a helpful assistant."},
                         {"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
            "session_id": f"s{i // 8}", "user_hash": user, "model": "SmolLM2-135M-Instruct", "adapter_version": None,
            "target_tool": rng.choice(TOOLS), "language": "en", "prompt_tokens": 30 + rng.randrange(20),
            "completion_tokens": 40 + rng.randrange(40), "latency_ms": round(rng.uniform(300, 3000), 1),
            "feedback": {}, "pii_entities": [], "pii_flagged": rng.random() < 0.01, "truncated": rng.random() < 0.02,
            "source": "chat", "ab_arm": None, "id": ident, "created_at": stamp, "recorded_at": stamp,
        }
        batch.append(orjson.dumps(record) + b"\n")
        if rng.random() < 0.3:  # three turns in ten get rated, a few corrected or marked private
            event = _feedback(rng, ident, user, moment + timedelta(milliseconds=100), answer)
            batch.append(orjson.dumps(event) + b"\n")
        if len(batch) >= 4096:
            yield b"".join(batch)
            batch.clear()
    yield b"".join(batch)


def _feedback(rng: random.Random, interaction_id: str, user: str, moment: datetime, answer: str) -> dict:
    roll = rng.random()
    if roll < 0.08:
        feedback = {"correction": answer + " Check the manual first.", "score": 2}
    elif roll < 0.1:
        feedback = {"private": True}
    elif roll < 0.7:
        feedback = {"score": rng.choice([4, 5])} if rng.random() < 0.5 else {"helpful": True}
    else:
        feedback = {"score": rng.choice([1, 2, 3])}
    return {"schema_version": 1, "type": "feedback", "id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            "created_at": _iso(moment), "interaction_id": interaction_id, "user_hash": user, "source": "chat",
            "feedback": feedback}
