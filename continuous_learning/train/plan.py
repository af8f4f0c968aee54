"""The step plan: which examples each optimizer step sees, in a seeded order that a resumed run repeats exactly,
length-grouped or packed into rows, and each process's share of a step. Pure functions of indices and lengths."""
from __future__ import annotations

import math
import random

from ..core.settings import TrainConfig
from .config import step_size


def example_order(n_examples: int, seed: int, start: int, count: int,
                  lengths: list[int] | None = None, micro: int = 1) -> list[int]:
    """Example indices `start .. start+count` of an endless stream of seeded shuffled epochs.

    The order depends only on (seed, position), so a resumed run sees exactly the batches it would have seen.
    With `lengths`, each epoch is length-grouped (see `group_by_length`) into micro-batches of `micro`.
    """
    out: list[int] = []
    position = start
    while len(out) < count:
        epoch, offset = divmod(position, n_examples)
        permutation = list(range(n_examples))
        random.Random(seed * 1_000_003 + epoch).shuffle(permutation)
        if lengths is not None:
            permutation = group_by_length(permutation, lengths, micro, seed * 1_000_003 + epoch)
        take = min(count - len(out), n_examples - offset)
        out.extend(permutation[offset : offset + take])
        position += take
    return out



MEGA_BATCH = 16  # micro-batches per length-sorted window: big enough to find look-alikes, small enough to stay random


def group_by_length(order: list[int], lengths: list[int], micro: int, seed: int) -> list[int]:
    """`order` regrouped so each micro-batch holds examples of similar length (less padding).

    Windows of MEGA_BATCH micro-batches are sorted by length (longest first), cut into micro-batches, and those
    micro-batches are shuffled (seeded) inside the window: still random across the epoch, the same for the same seed.
    """
    micro = max(1, micro)
    window = micro * MEGA_BATCH
    rng = random.Random(seed)
    out: list[int] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: (-lengths[i], i))
        batches = [chunk[k : k + micro] for k in range(0, len(chunk), micro)]
        rng.shuffle(batches)
        out.extend(i for batch in batches for i in batch)
    return out


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into as few rows of at most `capacity` tokens as first-fit needs, balanced so the
    rows come out about equally long (they are padded to the longest row of a forward pass).

    Longest first, each item goes to the emptiest row it fits in; the row count starts at ceil(total / capacity)
    and grows only when nothing fits. An item longer than `capacity` gets a row of its own (examples are cut to
    max_seq_len, so it does not happen). Rows come out fullest first."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = [[] for _ in range(max(1, math.ceil(sum(lengths) / capacity)))] if lengths else []
    used = [0] * len(rows)
    for i in order:
        fits = [r for r in range(len(rows)) if used[r] + lengths[i] <= capacity or not rows[r]]
        if fits:
            r = min(fits, key=lambda r: (used[r], r))
        else:
            rows.append([])
            used.append(0)
            r = len(rows) - 1
        rows[r].append(i)
        used[r] += lengths[i]
    rows = [row for row in rows if row]
    return sorted(rows, key=lambda row: -sum(lengths[i] for i in row))



def shard(items: list, rank: int, world: int) -> list:
    """This process's contiguous share of a global step (every share non-empty when len(items) >= world)."""
    per, extra = divmod(len(items), world)
    start = rank * per + min(rank, extra)
    return items[start : start + per + (1 if rank < extra else 0)]



def step_examples(examples: list[dict], cfg: TrainConfig, step: int, world: int, lengths: list[int]) -> list[dict]:
    """The examples of optimizer step `step` over all processes (the same list on every rank)."""
    size = step_size(cfg, world)
    if not examples:  # a snapshot of "no" answers only: the preference stream alone
        return []
    grouping = None if cfg.packing or not cfg.group_by_length else lengths
    order = example_order(len(examples), cfg.seed, step * size, size, grouping, cfg.batch_size)
    return [examples[i] for i in order]


def step_undesirable(undesirable: list[dict], cfg: TrainConfig, step: int, world: int, rank: int) -> list[dict]:
    """This process's undesirable answers for step `step`: as many as its SFT examples (a seeded stream)."""
    if not undesirable:
        return []
    count = cfg.batch_size * cfg.grad_accum
    start = (step * world + rank) * count
    order = example_order(len(undesirable), cfg.seed + 104729, start, count)
    return [undesirable[i] for i in order]


def step_anchors(anchors: list[dict], cfg: TrainConfig, step: int, world: int, rank: int,
                 pushes_down: bool) -> list[dict]:
    """This process's rehearsal examples for optimizer step `step` (a seeded stream, like the examples). A step
    that pushes "no" answers down (KTO or DPO) holds one more everyday prompt per SFT example to the base:
    pushing answers down bleeds into everyday ones unless something holds them."""
    if not anchors:
        return []
    count = cfg.rehearsal_per_step + (cfg.batch_size * cfg.grad_accum if pushes_down else 0)
    order = example_order(len(anchors), cfg.seed + 7919, (step * world + rank) * count, count)
    return [anchors[i] for i in order]
