"""`cl rollback` with 100 adapter versions: the whole command, as a user runs it, in under 0.5 s, against the floor:
a standard-library script that rewrites the registry JSON by hand (read, move the champion pointer back, append a
history entry, write a temp file, fsync, rename), also run with the sha256 check of the target's files that
`cl rollback` does. Every command is a fresh process; runs are interleaved."""
from __future__ import annotations


import sys

from .common import child_env, median, paired_ratios, result, run_measured, spread, summarise_session, timed
from .workspaces import apply_env, temp_home, registry_with_promotions, workspace_env

GOAL_S = 0.5
# A LoRA r16 adapter on every linear layer of SmolLM2-135M is about 20 MB of fp32 weights.
ADAPTER_BYTES = 20 * 2**20

# The floor: what a careful person would write with the standard library alone.
STDLIB_ROLLBACK = r"""
import hashlib, json, os, sys, tempfile
from datetime import datetime, timezone
home, check = sys.argv[1], sys.argv[2] == "check"
path = os.path.join(home, "adapters", "registry.json")
with open(path, encoding="utf-8") as handle:
    doc = json.load(handle)
old = doc["champion"]
promoted = [h for h in doc["history"] if h.get("action") == "promote" and h.get("to") == old]
target = promoted[-1]["from"] if promoted else None
if check and target is not None:
    entry = doc["adapters"][target]
    for name, digest in entry["sha256"].items():
        with open(os.path.join(home, entry["path"], name), "rb") as handle:
            if hashlib.sha256(handle.read()).hexdigest() != digest:
                sys.exit(f"{name} of {target} changed")
doc["champion"] = target
doc["history"].append({"action": "rollback", "from": old, "to": target, "reason": "floor",
                       "at": datetime.now(timezone.utc).isoformat()})
fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".registry.", suffix=".tmp")
with os.fdopen(fd, "w", encoding="utf-8") as handle:
    json.dump(doc, handle, indent=2)
    handle.flush()
    os.fsync(handle.fileno())
os.replace(tmp, path)
"""


def run(repeats: int, quick: bool) -> dict:
    with temp_home('rollback') as home:
        return _run(home, repeats, quick)


def _run(home, repeats: int, quick: bool) -> dict:
    versions = 20 if quick else 100
    env = workspace_env(home)
    apply_env(env)
    from continuous_learning.core.settings import load_settings

    settings = load_settings()
    registry_with_promotions(settings, versions, (2**20 if quick else ADAPTER_BYTES))
    runs = max(3, min(repeats, (versions - 2) // 3))  # each run rolls back three times: cl, floor, floor + check
    command = [sys.executable, "-m", "continuous_learning.cli", "rollback"]
    cli, floor, floor_check = [], [], []
    for _ in range(runs):
        cli.append(run_measured(command, env=child_env(**env)))
        floor.append(run_measured([sys.executable, "-c", STDLIB_ROLLBACK, str(home), "none"]))
        floor_check.append(run_measured([sys.executable, "-c", STDLIB_ROLLBACK, str(home), "check"]))
    failed = [r for r in cli + floor + floor_check if r["returncode"] != 0]
    if failed:
        raise RuntimeError(f"a rollback failed: {failed[0]['stderr'][-500:]}")
    cli_s = [r["seconds"] for r in cli]
    vs_floor = paired_ratios([r["seconds"] for r in floor], cli_s)
    vs_floor_check = paired_ratios([r["seconds"] for r in floor_check], cli_s)
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
        "stdlib_floor_s": [round(r["seconds"], 3) for r in floor],
        "stdlib_floor_with_sha256_s": [round(r["seconds"], 3) for r in floor_check],
        "ratio_vs_floor": vs_floor, "ratio_vs_floor_with_sha256": vs_floor_check,
    }
    met = measured < GOAL_S
    return result(
        workload=f"cl rollback with {versions} adapter versions",
        baseline="the floor: a standard-library script rewriting registry.json by hand (atomic), in a fresh process; "
                 "ratio = floor time / `cl rollback` time (below 1: slower than the floor)",
        goal="whole `cl rollback` command under 0.5 s",
        ratio_value=vs_floor["median"], goal_met=met, raw=raw, ratio_spread=[vs_floor["min"], vs_floor["max"]],
        why_missed=None if met else f"the whole command took {measured:.3f} s",
        where_time_goes=(f"process start + imports {raw['cli_help_median_s']} s (same as `cl --help`), the "
                         f"rollback itself "
                         f"{raw['library_rollback_median_s']} s: {profile}"),
        summary=f"`cl rollback` median {measured:.3f} s over {runs} runs; the library call alone "
                f"{raw['library_rollback_median_s']} s (sha256 of the target's ~{raw['adapter_mb']} MB files, "
                "registry read and atomic rewrite under its lock). The stdlib floor: "
                f"{median(raw['stdlib_floor_s']):.3f} s without checks ({vs_floor['median']}x, {spread(vs_floor)}), "
                f"{median(raw['stdlib_floor_with_sha256_s']):.3f} s with the sha256 check "
                f"({vs_floor_check['median']}x, "
                f"{spread(vs_floor_check)}). What `cl rollback` pays above the floor is its Python imports "
                "(typer, rich, the CLI) and the registry lock.",
    )


def _library_rollbacks(settings, runs: int) -> tuple[list[float], str]:
    from pyinstrument import Profiler

    from continuous_learning.registry import rollback_champion

    seconds = []
    profiler = Profiler(interval=0.0005)
    for i in range(runs):
        if i == runs - 1:
            profiler.start()
        took, _ = timed(lambda: rollback_champion(settings, steps=1, reason="bench"))
        seconds.append(took)
    profiler.stop()
    return seconds, summarise_session(profiler.last_session, 5)
