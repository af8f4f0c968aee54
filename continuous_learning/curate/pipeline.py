"""The curate chain: `run_curate` resolves one run's context under the curate lock, then passes the pooled
examples through the stages below, in this order, each `stage(pool, ctx) -> pool`:

    gather -> dedupe exact -> dedupe near -> cap domains -> take stock -> split -> replay -> write

A stage that ends the run (nothing new, or the snapshot written) sets `pool.result`, which `run_curate` returns.
"""
from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

from .. import registry
from ..core.settings import Settings
from ..storage.store import workspace_lock
from .cap import cap_flooding_domains
from .cursor import Cursor, previous_cursor
from .dedupe import drop_exact_duplicates, drop_near_duplicates
from .feedback import scan_feedback
from .gather import gather
from .manifest import take_stock
from .pool import ExamplePool, Spool
from .progress import Progress, count_lines
from .replay import add_replay
from .selection import Rules
from .snapshots import ids_in_snapshots, remove_orphans
from .split import split_off_eval
from .state import CurateContext, Pool
from .write import write

Stage = Callable[[Pool, CurateContext], Pool]

STAGES: tuple[Stage, ...] = (
    gather,
    drop_exact_duplicates,
    drop_near_duplicates,
    cap_flooding_domains,
    take_stock,
    split_off_eval,
    add_replay,
    write,
)


def run_chain(pool: Pool, ctx: CurateContext, stages: tuple[Stage, ...] = STAGES) -> dict:
    """Each stage in turn, until one sets the run's result."""
    for stage in stages:
        pool = stage(pool, ctx)
        if pool.result is not None:
            return pool.result
    raise RuntimeError(f"no curate stage ended the run (last: {stages[-1].__name__})")


def run_curate(
    settings: Settings,
    *,
    full: bool = False,
    include_unrated: bool | None = None,
    note: str | None = None,
    progress: Progress | None = None,
    now: datetime | None = None,
) -> dict:
    """Curate the new material into a snapshot. Returns its manifest (`status` "created"), or, when there is
    nothing new, a manifest with `status` "nothing_new", `id` None and a `message`, having written nothing."""
    now = now or datetime.now(UTC)
    config = settings.curate
    rules = Rules.from_config(config, include_unrated, now)
    with workspace_lock(settings.lock_dir, "curate"), _no_cyclic_gc():
        if config.retention_days > 0:  # retention is applied to the raw log on every curate, under the same lock
            from ..capture.gdpr import drop_expired

            drop_expired(settings, config.retention_days, now=now)
        doc = registry.load(settings)
        snapshots = doc["snapshots"]
        remove_orphans(settings, snapshots)
        cursor = Cursor() if full else previous_cursor(snapshots)
        scan = scan_feedback(settings.raw_log, cursor, progress, count_lines(settings.raw_log) if progress else None)
        already = set() if full else ids_in_snapshots(settings, snapshots, scan.late)
        ctx = CurateContext(settings, doc, scan, cursor, already, rules, full, note, progress, now)
        spool = Spool(settings.curated_dir)  # after remove_orphans, which would remove it
        try:
            return run_chain(Pool(ExamplePool(spool, config.seed, config.near_dup_threshold)), ctx)
        finally:
            spool.close()


@contextlib.contextmanager
def _no_cyclic_gc() -> Iterator[None]:
    """Curate builds hundreds of thousands of small acyclic objects; Python's cyclic collector would traverse all
    of them again and again (time growing faster than the log). Reference counting still frees everything."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
