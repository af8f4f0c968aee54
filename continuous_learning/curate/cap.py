"""Stage 4, domain cap: no `target_tool` keeps more than floor(cap x all desirable examples), best-rated first.

Turns without a target_tool are not a domain and are never capped; with a single domain there is nothing to
balance against, so nothing is capped. Undesirable ("no") examples neither count nor are capped. Capped turns are
remembered in the cursor and offered again with the next snapshot's new material."""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from .examples import KIND_RANK
from .pool import ExamplePool
from .state import CurateContext, Pool


def cap_flooding_domains(pool: Pool, ctx: CurateContext) -> Pool:
    """The rows left within the cap; the rest are `capped`."""
    kept, capped = pooled_cap_domains(pool.examples, pool.rows, ctx.config.domain_cap)
    return replace(pool, rows=kept, capped=capped)


def pooled_cap_domains(pool: ExamplePool, rows: Any, cap: float) -> tuple[Any, Any]:
    """The oracle's `cap_domains` over pooled rows: (kept rows, capped rows)."""
    import numpy as np

    desirable = pool.cols["kind"][rows] != KIND_RANK["unhelpful"]
    tools = np.where(desirable, pool.cols["tool"][rows], -1)
    codes, sizes = np.unique(tools[tools >= 0], return_counts=True)
    if cap >= 1 or len(codes) < 2:
        return rows, rows[:0]
    limit = max(1, math.floor(cap * int(desirable.sum())))
    capped: list[Any] = []
    for code in sorted((int(c) for c, n in zip(codes, sizes) if n > limit), key=lambda c: pool.tools[c]):
        capped.append(pool.rank_desc(rows[tools == code])[limit:])
    dropped = np.concatenate(capped) if capped else rows[:0]
    return rows[~np.isin(rows, dropped)], dropped
