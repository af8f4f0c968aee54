"""Stages 2 and 3, dedupe: collapse exact duplicates (same id), then near ones (MinHash proposes, exact shingle
Jaccard decides); the best-rated of each cluster survives, carrying the sources and users of all."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from .minhash import BandGroups
from .pool import ExamplePool, recent
from .state import CurateContext, Pool
from .text import jaccard, shingles


def drop_exact_duplicates(pool: Pool, ctx: CurateContext) -> Pool:
    """All pooled rows, one per id (first-arrival order)."""
    ctx.report("deduplicating", 0, None)
    rows, exact = pooled_dedupe_exact(pool.examples)
    return replace(pool, rows=rows, exact=exact)


def drop_near_duplicates(pool: Pool, ctx: CurateContext) -> Pool:
    """The rows left, one per near-duplicate cluster, best-rated first."""
    rows, near = pooled_dedupe_near(pool.examples, pool.rows)
    pool.examples.forget_text_keys()
    ctx.report("deduplicating", len(pool.rows), len(pool.rows))
    return replace(pool, rows=rows, near=near)


def pooled_dedupe_exact(pool: ExamplePool) -> tuple[Any, int]:
    """The oracle's `dedupe_exact` over the pool in arrival order: (survivor rows in first-arrival order, number
    collapsed)."""
    import numpy as np

    if len(pool) == 0:
        return np.zeros(0, dtype=np.int64), 0
    _, first, inverse, counts = np.unique(pool.cols["id"], return_index=True, return_inverse=True, return_counts=True)
    survivors = first.copy()
    by_group = np.argsort(inverse.ravel(), kind="stable")  # each group's rows together, in arrival order
    ends = np.cumsum(counts)
    for group in np.flatnonzero(counts > 1).tolist():
        survivors[group] = _absorb_chain(pool, by_group[ends[group] - counts[group] : ends[group]].tolist())
    return survivors[np.argsort(first, kind="stable")], int(len(pool) - len(first))


def _absorb_chain(pool: ExamplePool, members: list[int]) -> int:
    """Replays `kept.absorb(next)` over duplicates in arrival order; returns the surviving row."""
    kept = members[0]
    for row in members[1:]:
        if pool.rank(kept) >= pool.rank(row):
            pool.absorb(kept, row)
        else:
            pool.absorb(row, kept)
            kept = row
    return kept


def pooled_dedupe_near(pool: ExamplePool, rows: Any) -> tuple[Any, int]:
    """The oracle's `dedupe_near` over pooled rows: (survivors, best first, number collapsed)."""
    import numpy as np

    if not pool.near or len(rows) < 2:
        return rows, 0
    ordered = pool.rank_desc(rows)
    groups = BandGroups(pool.text_band_keys(ordered))
    kept = bytearray(b"\x01") * len(ordered)
    kept_in: dict[int, list[int]] = {}  # band group -> its kept positions so far (the only candidates that count)
    text_of = recent(lambda k: pool.text(int(ordered[k])))

    def shingles_of(k: int) -> set[str]:
        return shingles(text_of(k))

    for i in groups.grouped():  # a position sharing no band with another has no candidate: it is kept
        mine = groups.of(i)
        earlier = sorted({j for group in mine for j in kept_in.get(group, ())})
        match = _first_match(shingles_of, i, earlier, pool.threshold)
        if match is None:
            for group in mine:
                kept_in.setdefault(group, []).append(i)
        else:
            kept[i] = 0
            pool.absorb(int(ordered[match]), int(ordered[i]))
    survivors = ordered[np.frombuffer(bytes(kept), dtype=np.uint8).astype(bool)]
    return survivors, len(rows) - len(survivors)


def _first_match(shingles_of: Callable[[int], set[str]], i: int, candidates: list[int],
                 threshold: float) -> int | None:
    """The first candidate whose shingle Jaccard with position i reaches the threshold."""
    if not candidates:
        return None
    mine = shingles_of(i)
    return next((j for j in candidates if jaccard(mine, shingles_of(j)) >= threshold), None)
