"""The reference oracle of `cl curate`: the stages as plain functions over lists of `Example`s.

Production runs the pooled chain in continuous_learning/curate/ (numpy columns over a spool, for big logs); these
functions decide the same things the slow, obvious way, so a property test can hold the chain to them
(tests/test_curate_oracle.py). Every pooled stage makes the decision its list function here makes: same order,
ties, survivors and merged sources, so snapshots are byte-identical.
"""
from __future__ import annotations

import math
import tempfile
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from continuous_learning.core.settings import CurateConfig
from continuous_learning.curate import Example, ExamplePool, NearIndex, Spool, jaccard, shingles, short_hash
from continuous_learning.curate.split import DisjointSets, pooled_split_eval


def dedupe_exact(examples: Iterable[Example]) -> tuple[list[Example], int]:
    """Collapse examples with the same normalised text (same id). Returns (survivors, number collapsed)."""
    best: dict[str, Example] = {}
    collapsed = 0
    for example in examples:
        kept = best.get(example.id)
        if kept is None:
            best[example.id] = example
        else:
            best[example.id] = kept.absorb(example)
            collapsed += 1
    return list(best.values()), collapsed


def dedupe_near(examples: list[Example], threshold: float) -> tuple[list[Example], int]:
    """Collapse near duplicates (shingle Jaccard >= threshold) into the best-rated of each cluster."""
    if threshold >= 1 or len(examples) < 2:
        return list(examples), 0
    ordered = sorted(examples, key=lambda e: e.rank, reverse=True)  # best first, so the first of a cluster survives
    texts = [e.text for e in ordered]
    candidates = NearIndex(threshold).earlier_candidates(texts)
    kept: dict[int, Example] = {}
    for i, example in enumerate(ordered):
        match = _first_near(texts, i, [j for j in candidates.get(i, ()) if j in kept], threshold)
        if match is None:
            kept[i] = example
        else:
            kept[match] = kept[match].absorb(example)
    return list(kept.values()), len(examples) - len(kept)


def _first_near(texts: list[str], i: int, candidates: list[int], threshold: float) -> int | None:
    """The first candidate whose shingle Jaccard with text i reaches the threshold."""
    if not candidates:
        return None
    mine = shingles(texts[i])
    return next((j for j in candidates if jaccard(mine, shingles(texts[j])) >= threshold), None)


def cap_domains(examples: list[Example], cap: float) -> tuple[list[Example], list[Example]]:
    """(kept, capped): no `target_tool` keeps more than floor(cap x all examples), best-rated first.

    Turns without a target_tool are not a domain and are never capped; with a single domain there is
    nothing to balance against (untagged turns are not a rival domain), so nothing is capped. The cap balances
    what is imitated: undesirable ("no") examples neither count nor are capped.
    """
    domains = Counter(e.target_tool for e in examples if e.target_tool and e.desirable)
    if cap >= 1 or len(domains) < 2:
        return list(examples), []
    limit = max(1, math.floor(cap * sum(1 for e in examples if e.desirable)))
    capped: list[Example] = []
    for domain in sorted(d for d, n in domains.items() if n > limit):
        members = sorted((e for e in examples if e.target_tool == domain and e.desirable), key=lambda e: e.rank,
                         reverse=True)
        capped.extend(members[limit:])
    dropped = {id(e) for e in capped}
    return [e for e in examples if id(e) not in dropped], capped


def prompt_groups(examples: list[Example], threshold: float) -> list[list[int]]:
    """Indexes of examples whose final prompts are equal or near duplicates, as connected groups."""
    sets = DisjointSets()
    first: dict[str, int] = {}
    for i, example in enumerate(examples):
        sets.join(i, first.setdefault(example.prompt_key, i))
    if threshold < 1:
        # a repeated prompt is already joined to its first occurrence, which stands for it in the index
        distinct = [i for i, e in enumerate(examples) if first[e.prompt_key] == i]
        keys = [examples[i].prompt_key for i in distinct]
        for position, earlier in NearIndex(threshold).earlier_candidates(keys).items():
            mine = shingles(keys[position])
            for j in earlier:
                if jaccard(mine, shingles(keys[j])) >= threshold:
                    sets.join(distinct[position], distinct[j])
    groups: dict[int, list[int]] = {}
    for i in range(len(examples)):
        groups.setdefault(sets.root(i), []).append(i)
    return list(groups.values())


def split_eval(examples: list[Example], fraction: float, seed: int,
               threshold: float) -> tuple[list[Example], list[Example]]:
    """(train, eval) with about `fraction` held out; prompt groups go whole to one side, train never empty."""
    wanted = min(int(fraction * len(examples) + 0.5), len(examples) - 1)
    groups = prompt_groups(examples, threshold)
    if wanted <= 0 or len(groups) < 2:
        return list(examples), []
    order = sorted(groups, key=lambda g: short_hash(str(seed), min(examples[i].prompt_key for i in g)))
    held: set[int] = set()
    for group in order:
        if len(held) + len(group) <= wanted:
            held.update(group)
        if len(held) >= wanted:
            break
    train = [e for i, e in enumerate(examples) if i not in held]
    return train, [e for i, e in enumerate(examples) if i in held]


def leaked_prompts(train: list[Example], eval_examples: list[Example], threshold: float) -> list[Example]:
    """Train examples whose prompt is equal or near to an eval prompt (must be empty in a snapshot)."""
    if not eval_examples or not train:
        return []
    keys = {e.prompt_key for e in eval_examples}
    index = NearIndex.of([e.prompt_key for e in eval_examples], min(threshold, 0.999))
    near = index.matches_any([e.prompt_key for e in train])
    return [e for e, hit in zip(train, near) if hit or e.prompt_key in keys]


def curate_examples(examples: Iterable[Example], config: CurateConfig) -> dict:
    """The chain over selected examples, in list form: exact dedupe, near dedupe, domain cap, leak-free split;
    train and eval in file order (replay is the pooled chain's own: a full run has none)."""
    unique, exact = dedupe_exact(examples)
    distinct, near = dedupe_near(unique, config.near_dup_threshold)
    new, capped = cap_domains(distinct, config.domain_cap)
    train, held = split_eval(new, config.eval_fraction, config.seed, config.near_dup_threshold)
    return {"train": chronological(train), "eval": chronological(held), "new": new, "capped": capped,
            "exact": exact, "near": near}


def chronological(examples: list[Example]) -> list[Example]:
    return sorted(examples, key=lambda e: (e.created_at, e.id))


def pooled_split(examples: list[Example], fraction: float, seed: int,
                 threshold: float) -> tuple[list[Example], list[Example]]:
    """The split production runs (`pooled_split_eval`), over these examples pooled as a run pools them."""
    import numpy as np

    with tempfile.TemporaryDirectory() as folder:
        spool = Spool(Path(folder) / "curated")
        try:
            pool = ExamplePool(spool, seed, threshold)
            for example in examples:
                pool.add(example)
            pool.finish()
            train, held = pooled_split_eval(pool, np.arange(len(examples)), fraction)
            return [pool.example(int(row)) for row in train], [pool.example(int(row)) for row in held]
        finally:
            spool.close()
