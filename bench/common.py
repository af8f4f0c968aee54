"""Shared benchmark helpers: medians of repeated timings, peak memory, machine and version facts."""
from __future__ import annotations

import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "bench"
CACHE_DIR = BENCH_DIR / ".cache"
RESULT_KEYS = ("workload", "baseline", "goal", "ratio", "goal_met", "raw", "where_time_goes")


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, result) of one call."""
    started = time.perf_counter()
    value = fn()
    return time.perf_counter() - started, value


def timings(fn: Callable[[], Any], repeats: int) -> tuple[list[float], Any]:
    """Seconds of `repeats` calls (at least one) and the last call's result."""
    seconds, value = [], None
    for _ in range(max(1, repeats)):
        took, value = timed(fn)
        seconds.append(took)
    return seconds, value


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def ratio(baseline_s: float, ours_s: float) -> float | None:
    """How many times faster ours is than the baseline (None when it cannot be told)."""
    return round(baseline_s / ours_s, 2) if ours_s > 0 and baseline_s == baseline_s else None


def paired_ratios(numerators: list[float], denominators: list[float]) -> dict:
    """Per-repeat ratios numerator / denominator of interleaved runs, their median and spread (min, max)."""
    values = [round(n / d, 2) for n, d in zip(numerators, denominators) if d > 0]
    if not values:
        return {"per_repeat": [], "median": None, "min": None, "max": None}
    return {"per_repeat": values, "median": round(median(values), 2), "min": min(values), "max": max(values)}


def spread(ratios: dict) -> str:
    return f"spread {ratios['min']}-{ratios['max']}" if ratios.get("per_repeat") else "no runs"


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_measured(argv: list[str], env: dict | None = None, cwd: Path | None = None, one_core: bool = False) -> dict:
    """Run a child process; its wall time, CPU time, exit code, output and peak RSS (from wait4: this child only).
    `one_core` pins the child to a single CPU."""
    import tempfile

    def pin() -> None:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=err, preexec_fn=pin if one_core else None)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return {"seconds": seconds, "cpu_s": usage.ru_utime + usage.ru_stime,
                "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "returncode": proc.returncode,
                "stdout": out.read().decode("utf-8", "replace"), "stderr": err.read().decode("utf-8", "replace")}


def child_env(**extra: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **extra}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def profile_summary(fn: Callable[[], Any], top: int = 8) -> str:
    """The few functions where one call spends its time (pyinstrument), as 'name file: share' lines."""
    from pyinstrument import Profiler

    profiler = Profiler(interval=0.002)
    profiler.start()
    try:
        fn()
    finally:
        profiler.stop()
    return summarise_session(profiler.last_session, top)


def summarise_session(session: Any, top: int = 8) -> str:
    """Self time per function, biggest first (pyinstrument's frame tree flattened)."""
    root = session.root_frame()
    if root is None:
        return "no samples"
    totals: dict[str, float] = {}

    def walk(frame: Any) -> None:
        real_children = [c for c in frame.children if not c.is_synthetic]
        if not frame.is_synthetic:
            own = frame.time - sum(c.time for c in real_children)  # synthetic "[self]" leaves count as own time
            name = f"{frame.function} ({Path(frame.file_path or '?').name}:{frame.line_no})"
            if own > 0:
                totals[name] = totals.get(name, 0.0) + own
        for child in real_children:
            walk(child)

    walk(root)
    total = sum(totals.values()) or 1.0
    biggest = sorted(totals.items(), key=lambda kv: -kv[1])[:top]
    return "; ".join(f"{name} {100 * t / total:.0f}%" for name, t in biggest)


def gpu_name() -> str | None:
    """The CUDA device torch sees, or None (torch is imported in a child process, to keep this one light)."""
    code = "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out or None


def summarise_by_file(session: Any, file_name: str, top: int = 8) -> str:
    """Time charged to the functions defined in `file_name` (or in any file of a folder given as "name/"): every
    sample goes to the innermost such function on its stack (library calls included), so the shares partition the
    run and nothing counts twice."""
    root = session.root_frame()
    if root is None:
        return "no samples"
    totals: dict[str, float] = {}

    def walk(frame: Any, owner: str) -> None:
        path = Path(frame.file_path or "")
        if not frame.is_synthetic and file_name in (path.name, f"{path.parent.name}/"):
            owner = frame.function
        own = frame.time - sum(c.time for c in frame.children)
        totals[owner] = totals.get(owner, 0.0) + max(own, 0.0)
        for child in frame.children:
            walk(child, owner)

    walk(root, f"outside {file_name}")
    total = sum(totals.values()) or 1.0
    biggest = sorted(totals.items(), key=lambda kv: -kv[1])[:top]
    return "; ".join(f"{name} {100 * t / total:.0f}%" for name, t in biggest)


def package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def commit_info() -> dict:
    """The commit the figures were measured on, and whether the working tree had changes then."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"sha": git("rev-parse", "HEAD") or "unknown", "branch": git("rev-parse", "--abbrev-ref", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def machine_info() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        memory_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        memory_gb = None
    packages = ("torch", "transformers", "peft", "trl", "bitsandbytes", "presidio-analyzer", "presidio-anonymizer",
                "spacy", "numpy", "orjson", "llama-cpp-python")
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gb": memory_gb,
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "gpu": gpu_name(),
        "versions": {p: package_version(p) for p in packages},
    }


def result(workload: str, baseline: str, goal: str, ratio_value: float | None, goal_met: bool, raw: dict,
           where_time_goes: str, **extra: Any) -> dict:
    return {"workload": workload, "baseline": baseline, "goal": goal, "ratio": ratio_value, "goal_met": bool(goal_met),
            "raw": raw, "where_time_goes": where_time_goes, **extra}
