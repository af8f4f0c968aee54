"""Stage 7, replay: a seeded sample of earlier snapshots' train examples, rehearsed beside the new ones, that
repeats nothing new (no same or near example, no same or near prompt, so none is ever an eval prompt)."""
from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from datetime import datetime

from ..core.settings import Settings
from ..storage.crypto import cipher_from_env, open_messages
from ..storage.store import iter_jsonl
from .cursor import moment_of
from .examples import Example
from .minhash import NearIndex
from .snapshots import snapshot_paths
from .state import CurateContext, Pool
from .text import short_hash


def add_replay(pool: Pool, ctx: CurateContext) -> Pool:
    """`replay`: earlier examples to train on again (none in a full run, which curates everything anew)."""
    if ctx.full:
        return pool
    new = pool.rows
    replay = _replay(ctx, len(new), lambda: [pool.examples.example(row) for row in new.tolist()], pool.tally)
    return replace(pool, replay=replay)


def _replay(ctx: CurateContext, new_count: int, new: Callable[[], list[Example]], tally: Counter) -> list[Example]:
    """A seeded sample of earlier train examples that repeats nothing in `new()` (train and eval; built only when
    replay is on, and an incremental run's new material is small)."""
    config, snapshots = ctx.config, ctx.snapshots
    size = replay_size(config.replay_fraction, new_count)
    if not snapshots or size == 0:
        return []
    # a different salt per run, so successive snapshots replay different earlier examples
    earlier = earlier_examples(ctx.settings, snapshots, ctx.rules.expires_before, tally)
    candidates = sample_replay(earlier, 3 * size + 8, salt=f"{config.seed}:{len(snapshots)}")
    return choose_replay(candidates, size, new(), config.near_dup_threshold)


def replay_size(fraction: float, new_examples: int) -> int:
    """replay_fraction x new examples, at least one when replay is on and there is something new."""
    return max(1, int(fraction * new_examples + 0.5)) if fraction > 0 and new_examples > 0 else 0


def sample_replay(examples: Iterable[Example], size: int, salt: str) -> list[Example]:
    """A seeded uniform sample of `size` distinct examples (bottom-k by salted id hash), in constant memory."""
    heap: list[tuple[int, str, Example]] = []  # max-heap on priority via negation
    members: set[str] = set()
    for example in examples:
        if size <= 0 or example.id in members:
            continue
        priority = -int(short_hash(salt, example.id), 16)
        if len(heap) < size:
            heapq.heappush(heap, (priority, example.id, example))
            members.add(example.id)
        elif priority > heap[0][0]:
            _, evicted, _ = heapq.heapreplace(heap, (priority, example.id, example))
            members.discard(evicted)
            members.add(example.id)
    return [e for _, _, e in sorted(heap, reverse=True)]


def choose_replay(pool: list[Example], size: int, new: list[Example], threshold: float) -> list[Example]:
    """The first `size` pooled examples that repeat nothing new: no same or near example, no same or near
    prompt. `new` holds train and eval, so a replayed prompt can never also be an eval prompt."""
    if not pool or size <= 0:
        return []
    threshold = min(threshold, 0.999)
    texts = NearIndex.of([e.text for e in new], threshold).matches_any([e.text for e in pool])
    prompts = NearIndex.of([e.prompt_key for e in new], threshold).matches_any([e.prompt_key for e in pool])
    ids, prompt_keys = {e.id for e in new}, {e.prompt_key for e in new}
    chosen: list[Example] = []
    for example, near_text, near_prompt in zip(pool, texts, prompts):
        if near_text or near_prompt or example.id in ids or example.prompt_key in prompt_keys:
            continue
        chosen.append(example)
        ids.add(example.id)
        prompt_keys.add(example.prompt_key)
        if len(chosen) == size:
            break
    return chosen


def earlier_examples(settings: Settings, snapshots: list[dict], expires_before: datetime | None,
                     tally: Counter) -> Iterator[Example]:
    """Train examples of earlier snapshots, as replay candidates (expired ones left out)."""
    cipher = cipher_from_env()
    for _, path in snapshot_paths(settings, snapshots, ("file",)):
        if path is None:
            tally["replay_sources_missing"] += 1
            continue
        for _, record in iter_jsonl(path):
            if record.get("label") is False:  # "no" answers are not replayed: replay is SFT on what was good
                continue
            example = Example.from_record(open_messages(record, cipher), kind="replay")
            moment = moment_of(example.created_at) if example else None
            if example and not (expires_before and moment and moment < expires_before):
                yield example
