"""`cl curate` over 10M synthetic interactions (about 10 GB of log): wall time and peak memory of one run, the
whole command in a fresh process. One run only: it takes minutes, and the 1M figures (bench_curate.py) have the
repeats. The log is generated once into bench/.cache (several minutes) before anything is timed."""
from __future__ import annotations

from .bench_curate import curate_once
from .common import result
from .curate_data import raw_log

GOAL_S = 600.0
GOAL_MB = 500.0


def run(repeats: int, quick: bool) -> dict:
    n = 200_000 if quick else 10_000_000
    log = raw_log(n)
    figures = curate_once(n)
    seconds, peak = figures["seconds"], figures["peak_rss_mb"]
    met = seconds < GOAL_S and peak < GOAL_MB
    raw = {"interactions": n, "log_mb": round(log.stat().st_size / 2**20, 1), "runs": [figures],
           "single_threaded": True, "repeats": 1}
    return result(
        workload=f"cl curate over {n:,} synthetic interactions",
        baseline="absolute goal; ratio = 600 s / measured wall time",
        goal="under 10 minutes and under 500 MB peak memory, single-threaded",
        ratio_value=round(GOAL_S / seconds, 2), goal_met=met, raw=raw,
        why_missed=None if met else f"{seconds:.0f} s, peak {peak} MB",
        where_time_goes="see the curate workload's profile (same code path, 1M interactions)",
        summary=(f"{n:,} interactions ({raw['log_mb']:,} MB of log): {seconds:.1f} s wall ({figures['cpu_s']:.1f} s "
                 f"CPU), peak {peak} MB; {figures['examples']:,} examples selected, {figures['deduped']:,} "
                 f"duplicates dropped. One run (it takes minutes)."),
    )
