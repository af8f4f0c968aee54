"""Stage 6, the leak-free split: whole prompt groups (equal or near-duplicate final prompts) go to one side, so no
prompt is in both train and eval; about `eval_fraction` is held out, train is never empty."""
from __future__ import annotations

from dataclasses import replace
from typing import Any

from .minhash import BandGroups
from .pool import ExamplePool, hex64, recent
from .state import CurateContext, Pool
from .text import jaccard, shingles, short_hash


def split_off_eval(pool: Pool, ctx: CurateContext) -> Pool:
    """`train` and `held` (eval) rows, each in the order of `rows`."""
    train, held = pooled_split_eval(pool.examples, pool.rows, ctx.config.eval_fraction)
    return replace(pool, train=train, held=held)


class DisjointSets:
    """Union-find over integers. One never joined is its own set and takes no memory."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def root(self, i: int) -> int:
        parent = self.parent
        while parent.get(i, i) != i:
            parent[i] = parent.get(parent[i], parent[i])
            i = parent[i]
        return i

    def join(self, i: int, j: int) -> None:
        a, b = self.root(i), self.root(j)
        if a != b:
            self.parent[a] = b

    def joined(self) -> list[int]:
        """Every integer that was joined to another."""
        return list(self.parent)


def pooled_split_eval(pool: ExamplePool, rows: Any, fraction: float) -> tuple[Any, Any]:
    """The oracle's `split_eval` over pooled rows: (train rows, eval rows), each in the given order."""
    import numpy as np

    wanted = min(int(fraction * len(rows) + 0.5), len(rows) - 1)
    _, group_of, sizes = np.unique(_pooled_prompt_roots(pool, rows), return_inverse=True, return_counts=True)
    if wanted <= 0 or len(sizes) < 2:
        return rows, rows[:0]
    members = np.argsort(group_of.ravel(), kind="stable")  # each group's positions together, ascending
    ends = np.cumsum(sizes)
    # short_hash(seed, smallest prompt of the group) as a number sorts as its fixed-width hex text does
    order_keys = np.empty(len(sizes), dtype=np.uint64)
    singles = sizes == 1
    order_keys[singles] = pool.cols["prompt_hash"][rows[members[(ends - 1)[singles]]]]
    for group in np.flatnonzero(~singles).tolist():
        positions = members[ends[group] - sizes[group] : ends[group]].tolist()
        smallest = min(pool.prompt_key(int(rows[i])) for i in positions)
        order_keys[group] = hex64(short_hash(pool.seed, smallest))
    held = np.zeros(len(rows), dtype=bool)
    taken = 0
    for group in np.argsort(order_keys, kind="stable").tolist():
        size = int(sizes[group])
        if taken + size <= wanted:
            held[members[ends[group] - size : ends[group]]] = True
            taken += size
        if taken >= wanted:
            break
    return rows[~held], rows[held]


def _pooled_prompt_roots(pool: ExamplePool, rows: Any) -> Any:
    """The oracle's `prompt_groups` over pooled rows, as one group label per position (connected components:
    equal prompts, matched by their 64-bit seeded hash, and near ones). Only positions that join another are in
    the union-find."""
    import numpy as np

    groups = DisjointSets()
    _, first, inverse = np.unique(pool.cols["prompt_hash"][rows], return_index=True, return_inverse=True)
    representative = first[inverse.ravel()]
    for i in np.flatnonzero(representative != np.arange(len(rows))).tolist():
        groups.join(i, int(representative[i]))
    if pool.near:
        distinct = np.sort(first)
        prompt_of = recent(lambda k: pool.prompt_key(int(rows[distinct[k]])))

        def shingles_of(k: int) -> set[str]:
            return shingles(prompt_of(k))

        _join_near_prompts(groups, BandGroups(pool.prompt_band_keys(rows[distinct])), distinct.tolist(), shingles_of,
                           pool.threshold)
    roots = np.arange(len(rows))
    for i in groups.joined():
        roots[i] = groups.root(i)
    return roots


def _join_near_prompts(groups: DisjointSets, bands: BandGroups, rows: list[int], shingles_of, threshold: float) -> None:
    """Join every two prompts that share an LSH band and reach the Jaccard threshold (positions in `rows` order).

    The components are those of all such pairs, but a pair already in one component is never compared: each band
    group keeps its earlier members by component, and a prompt is compared with a component's members only until
    one matches. A band group of k near-identical prompts then costs about k comparisons, not k * (k - 1) / 2."""
    members: dict[int, dict[int, list[int]]] = {}  # band group -> component root -> earlier positions in it
    for position in bands.grouped():
        mine: set[str] | None = None
        for band_group in bands.of(position):
            by_root = _by_current_root(members.setdefault(band_group, {}), groups)
            for root, earlier in list(by_root.items()):
                if groups.root(root) == groups.root(rows[position]):
                    continue
                mine = mine if mine is not None else shingles_of(position)
                if any(jaccard(mine, shingles_of(j)) >= threshold for j in earlier):
                    groups.join(rows[position], root)
            by_root.setdefault(groups.root(rows[position]), []).append(position)


def _by_current_root(by_root: dict[int, list[int]], groups: DisjointSets) -> dict[int, list[int]]:
    """A band group's members filed again under their components' current roots (components merge as prompts
    join them)."""
    for root in [r for r in by_root if groups.root(r) != r]:
        by_root.setdefault(groups.root(root), []).extend(by_root.pop(root))
    return by_root
