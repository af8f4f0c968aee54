"""`cl rollback` with 100 adapter versions: the whole command, as a user runs it, in under 0.5 s."""
from __future__ import annotations


import sys

from .common import child_env, median, result, run_measured, summarise_session, timed
from .workspaces import apply_env, temp_home, registry_with_promotions, workspace_env

GOAL_S = 0.5
# A LoRA r16 adapter on every linear layer of SmolLM2-135M is about 20 MB of fp32 weights.
ADAPTER_BYTES = 20 * 2**20


def run(repeats: int, quick: bool) -> dict:
    with temp_home('rollback') as home:
        return _run(home, repeats, quick)


def _run(home, repeats: int, quick: bool) -> dict:
    versions = 10 if quick else 100
    env = workspace_env(home)
    apply_env(env)
    from continuous_learning.core.settings import load_settings

    settings = load_settings()
    registry_with_promotions(settings, versions, (2**20 if quick else ADAPTER_BYTES))
    runs = min(repeats, versions - 2)
    command = [sys.executable, "-m", "continuous_learning.cli", "rollback"]
    cli = [run_measured(command, env=child_env(**env)) for _ in range(runs)]
    failed = [r for r in cli if r["returncode"] != 0]
    if failed:
        raise RuntimeError(f"cl rollback failed: {failed[0]['stderr'][-500:]}")
    cli_s = [r["seconds"] for r in cli]
    help_s = [run_measured([sys.executable, "-m", "continuous_learning.cli", "--help"], env=child_env(**env))["seconds"]
              for _ in range(runs)]
    library_s, profile = _library_rollbacks(settings, runs)
    measured = median(cli_s)
    raw = {
        "versions": versions, "adapter_mb": round((2**20 if quick else ADAPTER_BYTES) / 2**20, 1),
        "cli_rollback_s": [round(s, 3) for s in cli_s], "cli_rollback_median_s": round(measured, 3),
        "cli_help_median_s": round(median(help_s), 3),
        "library_rollback_median_s": round(median(library_s), 4),
        "peak_rss_mb_cli": max(r["peak_rss_mb"] for r in cli),
    }
    return result(
        workload=f"cl rollback with {versions} adapter versions",
        baseline="none (absolute goal); ratio = 0.5 s goal / measured median",
        goal="whole `cl rollback` command under 0.5 s",
        ratio_value=round(GOAL_S / measured, 2), goal_met=measured < GOAL_S, raw=raw,
        where_time_goes=(f"process start + imports {raw['cli_help_median_s']} s (same as `cl --help`), the rollback itself "
                         f"{raw['library_rollback_median_s']} s: {profile}"),
        summary=f"`cl rollback` median {measured:.3f} s over {runs} runs; the library call alone "
                f"{raw['library_rollback_median_s']} s (sha256 of the target's ~{raw['adapter_mb']} MB files, "
                "registry read and atomic rewrite under its lock).",
    )


def _library_rollbacks(settings, runs: int) -> tuple[list[float], str]:
    from pyinstrument import Profiler

    from continuous_learning.decisions import rollback_champion

    seconds = []
    profiler = Profiler(interval=0.0005)
    for i in range(runs):
        if i == runs - 1:
            profiler.start()
        took, _ = timed(lambda: rollback_champion(settings, steps=1, reason="bench"))
        seconds.append(took)
    profiler.stop()
    return seconds, summarise_session(profiler.last_session, 5)
