"""`python -m bench [--only NAME[,NAME]] [--repeats N] [--quick] [--gpu]`: run the benchmarks.

A whole run writes bench/results.json and bench/RESULTS.md anew, from this run alone, stamped with the commit and
the machine. It leaves out the workloads with their own budget (curate_10m: minutes, and a 10 GB log): `--only
curate_10m` runs it into bench/results-curate_10m.json and RESULTS-curate_10m.md. Any other run with --only or
--quick writes bench/results-partial.json and RESULTS-partial.md instead: partial figures never mix with a whole
run's. --gpu runs the CUDA workloads (bench/bench_gpu.py) into results-gpu.json and
RESULTS-gpu.md, and says so plainly when there is no GPU."""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import orjson

from .common import BENCH_DIR, RESULT_KEYS, child_env, commit_info, machine_info
from .report import render_markdown

GPU_WORKLOAD = "gpu"
NOT_ALONE = {GPU_WORKLOAD, "export"}  # export's llama.cpp figures are part of the chat workload
# Workloads with their own budget (minutes, and a 10 GB generated log): run them with --only, not by default.
OWN_BUDGET = {"curate_10m"}
# the default run's order: quick workloads first, so an error shows early; the 10M curate last
ORDER = ("rollback", "eval", "chat", "sanitize", "train", "loop", "curate", "curate_10m")


def discover() -> list[str]:
    names = [p.stem.removeprefix("bench_") for p in BENCH_DIR.glob("bench_*.py")]
    names = [n for n in names if n not in NOT_ALONE and n not in OWN_BUDGET]
    return sorted(names, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))


def output_names(args: argparse.Namespace) -> tuple[str, str]:
    """(json, markdown) file names: the whole run's, a partial run's, or the GPU run's."""
    if args.gpu:
        return "results-gpu.json", "RESULTS-gpu.md"
    if args.names and set(args.names) <= OWN_BUDGET and not args.quick:
        label = "+".join(args.names)
        return f"results-{label}.json", f"RESULTS-{label}.md"
    if args.only or args.quick:
        return "results-partial.json", "RESULTS-partial.md"
    return "results.json", "RESULTS.md"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--only", help="comma-separated workload names (default: all)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement; medians are reported")
    parser.add_argument("--quick", action="store_true", help="tiny inputs, for smoke tests")
    parser.add_argument("--out", type=Path, default=BENCH_DIR, help="folder for RESULTS.md and results.json")
    parser.add_argument("--gpu", action="store_true", help="the CUDA workloads (training and eval) only")
    args = parser.parse_args(argv)
    names = discover()
    if args.gpu:
        args.names = [GPU_WORKLOAD]
        return args
    known = names + sorted(OWN_BUDGET)
    args.names = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else names
    unknown = [n for n in args.names if n not in known]
    if unknown:
        parser.error(f"unknown workload(s) {', '.join(unknown)}; known: {', '.join(known)}")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def run_one(name: str, repeats: int, quick: bool) -> dict:
    """One workload in its own process, so imports and peak memory do not leak between workloads."""
    code = (
        "import sys, orjson, importlib;"
        f"m = importlib.import_module('bench.bench_{name}');"
        f"r = m.run({repeats}, {quick});"
        "sys.stdout.buffer.write(b'\\n@@RESULT@@' + orjson.dumps(r, option=orjson.OPT_SERIALIZE_NUMPY))"
    )
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True)
    seconds = round(time.perf_counter() - started, 1)
    stdout = proc.stdout.decode("utf-8", "replace")
    marker = stdout.rfind("@@RESULT@@")
    if proc.returncode != 0 or marker < 0:
        tail = proc.stderr.decode("utf-8", "replace").strip().splitlines()[-15:]
        return {"workload": name, "baseline": "", "goal": "", "ratio": None, "goal_met": False, "raw": {},
                "where_time_goes": "", "error": "\n".join(tail) or f"exit code {proc.returncode}",
                "bench_seconds": seconds}
    found = orjson.loads(stdout[marker + len("@@RESULT@@"):])
    missing = [k for k in RESULT_KEYS if k not in found]
    if missing:
        found["error"] = f"result lacks {', '.join(missing)}"
    found["bench_seconds"] = seconds
    return found


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    json_name, md_name = output_names(args)
    out_json, out_md = args.out / json_name, args.out / md_name
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    commit = commit_info()
    fresh: dict[str, dict] = {}
    for name in args.names:
        print(f"bench {name} ...", flush=True)
        fresh[name] = entry = run_one(name, args.repeats, args.quick)
        entry["quick"] = args.quick
        entry["measured_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        if entry.get("no_gpu"):
            print(f"  {entry['summary']}", flush=True)
        shown = ("error" if entry.get("error") else "not run (no GPU)" if entry.get("no_gpu")
                 else f"ratio {entry['ratio']}, goal {'met' if entry['goal_met'] else 'NOT met'}")
        print(f"  {name}: {shown} ({entry['bench_seconds']} s)", flush=True)
        if entry.get("error"):
            print("  " + entry["error"].replace("\n", "\n  "), file=sys.stderr)
    doc = {"kind": "gpu" if args.gpu else "partial" if (args.only or args.quick) else "whole",
           "own_budget": sorted(OWN_BUDGET),
           "commit": commit, "machine": machine_info(), "repeats": args.repeats, "quick": args.quick,
           "started_at": started_at, "updated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "workloads": fresh}
    args.out.mkdir(parents=True, exist_ok=True)
    out_json.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n")
    out_md.write_text(render_markdown(doc))
    print(f"wrote {out_md} and {out_json}")
    return 1 if any(e.get("error") for e in fresh.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
