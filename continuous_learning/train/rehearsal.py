"""Rehearsal material: the base model's own answers to everyday prompts, generated once per base model.

Training on a dozen new facts pulls a small model away from what it already knew, most visibly on numbers.
The trainer keeps the adapter close to the frozen base on these answers (a KL term in every step, `train.rehearsal =
"kl"`), or trains on them as extra examples (`"sft"`). The answers are generated greedily once per base model and
cached beside it; for the bundled model on the defaults they ship with the package (`data/rehearsal-<key>.jsonl`).
None of these prompts is in the shipped everyday eval sets, so the gate's forgetting check is not flattered by them.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import orjson

from ..chat.models import BaseModel, ChatModel, load_model, load_tokenizer
from ..core.settings import SHIPPED_DATA, Settings
from ..storage.store import atomic_write_jsonl, iter_jsonl

ANSWER_TOKENS = 32


def rehearsal_prompts() -> list[str]:
    path = SHIPPED_DATA / "rehearsal_prompts.jsonl"
    return [orjson.loads(line)["prompt"] for line in path.read_bytes().splitlines() if line.strip()]


def _cache_file(settings: Settings, base: BaseModel, prompts: list[str]) -> Path:
    material = orjson.dumps([base.sha256, settings.chat.system_prompt, prompts, ANSWER_TOKENS])
    key = hashlib.sha256(material).hexdigest()[:16]
    return settings.model_cache / f"rehearsal-{key}.jsonl"


def rehearsal_records(settings: Settings, base: BaseModel) -> list[dict]:
    """Snapshot-format records (kind 'rehearsal', no system message) for `train.rehearsal_examples` prompts."""
    count = settings.train.rehearsal_examples
    if count <= 0 or settings.train.rehearsal == "off":
        return []
    prompts = rehearsal_prompts()[:count]
    cache = _cache_file(settings, base, prompts)
    if not cache.exists():
        shipped = SHIPPED_DATA / cache.name  # the bundled model's answers on the defaults, generated the same way
        records = list(iter_jsonl(shipped)) if shipped.is_file() else []
        atomic_write_jsonl(cache, [r for _, r in records] if records else _generate(settings, base, prompts))
    weight = settings.train.rehearsal_weight
    return [{**record, "weight": weight, "kind": "rehearsal"} for _, record in iter_jsonl(cache)]


def _generate(settings: Settings, base: BaseModel, prompts: list[str]) -> list[dict]:
    chat = ChatModel(base=base, model=load_model(base), tokenizer=load_tokenizer(base))
    system = [{"role": "system", "content": settings.chat.system_prompt}] if settings.chat.system_prompt else []
    conversations = [system + [{"role": "user", "content": p}] for p in prompts]
    answers = chat.generate_batch(conversations, max_new_tokens=ANSWER_TOKENS, batch_size=8)
    return [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a}]}
            for p, a in zip(prompts, answers) if a.strip()]
