"""`python -m bench [--only NAME[,NAME]] [--repeats N] [--quick]`: run the benchmarks, rewrite RESULTS.md and
results.json (with --only, the named entries are replaced and the others kept)."""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import orjson

from .common import BENCH_DIR, RESULT_KEYS, child_env, machine_info
from .report import render_markdown

RESULTS_JSON = BENCH_DIR / "results.json"
RESULTS_MD = BENCH_DIR / "RESULTS.md"


def discover() -> list[str]:
    return sorted(p.stem.removeprefix("bench_") for p in BENCH_DIR.glob("bench_*.py"))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--only", help="comma-separated workload names (default: all)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement; medians are reported")
    parser.add_argument("--quick", action="store_true", help="tiny inputs, for smoke tests")
    parser.add_argument("--out", type=Path, default=BENCH_DIR, help="folder for RESULTS.md and results.json")
    args = parser.parse_args(argv)
    names = discover()
    args.names = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else names
    unknown = [n for n in args.names if n not in names]
    if unknown:
        parser.error(f"unknown workload(s) {', '.join(unknown)}; known: {', '.join(names)}")
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
                "where_time_goes": "", "error": "\n".join(tail) or f"exit code {proc.returncode}", "bench_seconds": seconds}
    found = orjson.loads(stdout[marker + len("@@RESULT@@"):])
    missing = [k for k in RESULT_KEYS if k not in found]
    if missing:
        found["error"] = f"result lacks {', '.join(missing)}"
    found["bench_seconds"] = seconds
    return found


def merge(previous: dict, fresh: dict[str, dict], meta: dict) -> dict:
    workloads = dict(previous.get("workloads") or {})
    workloads.update(fresh)
    return {**meta, "workloads": dict(sorted(workloads.items()))}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out_json, out_md = args.out / RESULTS_JSON.name, args.out / RESULTS_MD.name
    previous = orjson.loads(out_json.read_bytes()) if out_json.exists() else {}
    fresh: dict[str, dict] = {}
    for name in args.names:
        print(f"bench {name} ...", flush=True)
        fresh[name] = entry = run_one(name, args.repeats, args.quick)
        entry["quick"] = args.quick
        entry["measured_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        shown = "error" if entry.get("error") else f"ratio {entry['ratio']}, goal {'met' if entry['goal_met'] else 'NOT met'}"
        print(f"  {name}: {shown} ({entry['bench_seconds']} s)", flush=True)
        if entry.get("error"):
            print("  " + entry["error"].replace("\n", "\n  "), file=sys.stderr)
    meta = {"machine": machine_info(), "repeats": args.repeats, "updated_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    doc = merge(previous, fresh, meta)
    args.out.mkdir(parents=True, exist_ok=True)
    out_json.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n")
    out_md.write_text(render_markdown(doc))
    print(f"wrote {out_md} and {out_json}")
    return 1 if any(e.get("error") for e in fresh.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
