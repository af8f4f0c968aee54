"""`cl curate` over 100k and 1M synthetic interactions: wall time, peak memory and how both scale with the log, and
where the time goes, from a profile of one more 100k run in this same benchmark run (bench_curate_10m.py: 10M)."""
from __future__ import annotations

import os
import shutil
import sys

import orjson

from .common import child_env, commit_info, median, result, run_measured
from .curate_data import raw_log
from .workspaces import new_home, workspace_env

GOAL_S = 120.0
GOAL_MB = 1024.0
GOAL_SCALING = 11.0
GOAL_MEMORY_RATIO = 1.5  # "flat in the log size": peak at 10x the log at most 1.5x the smaller run's peak
CURATE_FILE = "curate/"  # the package: every stage module
LARGE_RUNS = 1  # the 1M run takes minutes on a loaded machine; the 100k runs have the repeats

# `cl curate --json` in-process under pyinstrument; prints the session's summary after a marker.
PROFILED_CURATE = """
import sys, orjson
from pyinstrument import Profiler
from bench.common import summarise_session, summarise_by_file
from continuous_learning.cli import main
profiler = Profiler(interval=0.005)
profiler.start()
try:
    main(["curate", "--json"])
except SystemExit:
    pass
profiler.stop()
session = profiler.last_session
out = {"self": summarise_session(session, 8), "stages": summarise_by_file(session, "%s", 8),
       "seconds": round(session.duration, 2)}
sys.stdout.write("@@PROFILE@@" + orjson.dumps(out).decode())
""" % CURATE_FILE


def workspace_with_log(interactions: int):
    home = new_home("curate")
    log = home / "data" / "ingestion" / "raw_interactions.jsonl"
    log.parent.mkdir(parents=True)
    os.link(raw_log(interactions), log)  # curate only reads the raw log (retention is off by default)
    return home, child_env(**workspace_env(home), OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")


def curate_once(interactions: int) -> dict:
    """One `cl curate --json` in a fresh workspace whose raw log is the cached synthetic file (one thread)."""
    home, env = workspace_with_log(interactions)
    try:
        run = run_measured([sys.executable, "-m", "continuous_learning.cli", "curate", "--json"], env=env)
        if run["returncode"] != 0:
            raise RuntimeError(f"cl curate failed on {interactions} interactions: {run['stderr'][-800:]}")
        counts = orjson.loads(run["stdout"])["counts"]
        return {"seconds": round(run["seconds"], 2), "cpu_s": round(run["cpu_s"], 2), "peak_rss_mb": run["peak_rss_mb"],
                "lines": counts["lines"], "examples": counts["new_examples"], "deduped": counts["deduped"],
                "train": counts["train"], "eval": counts["eval"]}
    finally:
        shutil.rmtree(home, ignore_errors=True)


def profile_once(interactions: int) -> dict:
    """Where one `cl curate` over `interactions` spends its time (pyinstrument, in a fresh process)."""
    home, env = workspace_with_log(interactions)
    try:
        run = run_measured([sys.executable, "-c", PROFILED_CURATE], env=env)
        marker = run["stdout"].rfind("@@PROFILE@@")
        if run["returncode"] != 0 or marker < 0:
            raise RuntimeError(f"profiled cl curate failed: {run['stderr'][-800:]}")
        return orjson.loads(run["stdout"][marker + len("@@PROFILE@@"):])
    finally:
        shutil.rmtree(home, ignore_errors=True)


def run(repeats: int, quick: bool) -> dict:
    small_n, large_n = (2_000, 20_000) if quick else (100_000, 1_000_000)
    for n in (small_n, large_n):
        raw_log(n)  # generate (or reuse) before timing
    small = [curate_once(small_n) for _ in range(max(1, repeats))]
    large = [curate_once(large_n) for _ in range(LARGE_RUNS)]
    profile = profile_once(small_n)  # the larger log would add minutes to the run; the same code path
    small_s, large_s = median([r["seconds"] for r in small]), median([r["seconds"] for r in large])
    small_cpu, large_cpu = median([r["cpu_s"] for r in small]), median([r["cpu_s"] for r in large])
    small_mb, large_mb = max(r["peak_rss_mb"] for r in small), max(r["peak_rss_mb"] for r in large)
    scaling = round(large_s / small_s, 2)
    cpu_scaling = round(large_cpu / small_cpu, 2)
    memory_ratio = round(large_mb / small_mb, 2)
    raw = {
        "interactions": [small_n, large_n], "single_threaded": True,
        f"runs_{small_n}": small, f"runs_{large_n}": large,
        "median_s": [round(small_s, 2), round(large_s, 2)], "median_cpu_s": [round(small_cpu, 2), round(large_cpu, 2)],
        "spread_s": [[min(r["seconds"] for r in rows), max(r["seconds"] for r in rows)] for rows in (small, large)],
        "peak_rss_mb": [small_mb, large_mb], "time_scaling_10x": scaling, "cpu_scaling_10x": cpu_scaling,
        "memory_ratio_10x": memory_ratio,
        "log_mb": [round(raw_log(n).stat().st_size / 2**20, 1) for n in (small_n, large_n)],
        "profile": profile, "code_commit": commit_info(),
    }
    met = large_s < GOAL_S and large_mb < GOAL_MB and scaling <= GOAL_SCALING and memory_ratio <= GOAL_MEMORY_RATIO
    return result(
        workload=f"cl curate over {small_n:,} and {large_n:,} synthetic interactions",
        baseline=f"scaling: the {small_n:,} run; ratio = time({large_n:,}) / time({small_n:,}), goal <= 11",
        goal=(f"1M in under 2 minutes (single-threaded), peak memory under 1 GB and flat in the log size (peak at "
              f"{large_n:,} <= {GOAL_MEMORY_RATIO}x the peak at {small_n:,}), 10x data in at most 11x wall time"),
        ratio_value=scaling, goal_met=met, raw=raw,
        why_missed=None if met else (f"{large_n:,}: {large_s:.1f} s, {large_mb} MB; {scaling}x time and "
                                     f"{memory_ratio}x memory for 10x the log"),
        where_time_goes=(f"profile of one more {small_n:,} run ({profile['seconds']} s under the profiler), each "
                         f"sample charged to the innermost curate/ function on its stack: {profile['stages']}. "
                         f"Self time by function: {profile['self']}"),
        summary=(f"{large_n:,} interactions: {large_s:.1f} s wall ({large_cpu:.1f} s CPU) (single-threaded, "
                 f"{len(large)} run(s), {raw['spread_s'][1][0]}-{raw['spread_s'][1][1]} s), peak {large_mb} MB; "
                 f"{small_n:,}: "
                 f"{small_s:.1f} s ({small_cpu:.1f} s CPU), {small_mb} MB. 10x the log took {scaling}x the wall time "
                 f"({cpu_scaling}x CPU) and {memory_ratio}x the peak memory. This workload's code: commit "
                 f"{raw['code_commit']['sha'][:12]}."),
    )
