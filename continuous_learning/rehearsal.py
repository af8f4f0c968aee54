"""Rehearsal: the base model's own answers to everyday prompts, mixed into every training run.

A few dozen facts trained for a hundred steps pull a small model away from what it already knew (in the demo,
everyday accuracy fell from 16/16 to 11-12/16). Training on its own greedy answers to unrelated everyday prompts
keeps its behaviour there in place; the answers are generated once per base model and cached beside it.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import orjson

from .models import BaseModel, ChatModel, load_model, load_tokenizer
from .settings import Settings
from .store import atomic_write_jsonl, iter_jsonl

ANSWER_TOKENS = 96


def rehearsal_prompts() -> list[str]:
    path = Path(__file__).parent / "data" / "rehearsal_prompts.jsonl"
    return [orjson.loads(line)["prompt"] for line in path.read_bytes().splitlines() if line.strip()]


def _cache_file(settings: Settings, base: BaseModel, prompts: list[str]) -> Path:
    key = hashlib.sha256(orjson.dumps([base.sha256, settings.chat.system_prompt, prompts, ANSWER_TOKENS])).hexdigest()[:16]
    return settings.model_cache / f"rehearsal-{key}.jsonl"


def rehearsal_records(settings: Settings, base: BaseModel) -> list[dict]:
    """Snapshot-format records (kind 'rehearsal') answering `train.rehearsal_examples` everyday prompts."""
    count = settings.train.rehearsal_examples
    if count <= 0:
        return []
    prompts = rehearsal_prompts()[:count]
    cache = _cache_file(settings, base, prompts)
    if not cache.exists():
        atomic_write_jsonl(cache, _generate(settings, base, prompts))
    weight = settings.train.rehearsal_weight
    return [{**record, "weight": weight, "kind": "rehearsal"} for _, record in iter_jsonl(cache)]


def _generate(settings: Settings, base: BaseModel, prompts: list[str]) -> list[dict]:
    chat = ChatModel(base=base, model=load_model(base), tokenizer=load_tokenizer(base))
    conversations = [[{"role": "system", "content": settings.chat.system_prompt}, {"role": "user", "content": p}] for p in prompts]
    answers = chat.generate_batch(conversations, max_new_tokens=ANSWER_TOKENS, batch_size=8)
    return [{"messages": [*c, {"role": "assistant", "content": a}]} for c, a in zip(conversations, answers) if a.strip()]
