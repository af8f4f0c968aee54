"""RESULTS.md from the results document."""
from __future__ import annotations

import orjson


def _ratio(value) -> str:
    return "n/a" if value is None else f"{value:g}x"


def render_markdown(doc: dict) -> str:
    machine = doc.get("machine", {})
    versions = ", ".join(f"{k} {v}" for k, v in machine.get("versions", {}).items())
    lines = [
        "# Benchmark results",
        "",
        "Written by `make bench` (`python -m bench`); do not edit by hand. Each workload runs the project's path and "
        "a named baseline on the same input in the same run; figures are medians of repeated runs, and the ratio "
        "(baseline time / project time) is what to read on this shared, noisy machine.",
        "",
        f"- updated: {doc.get('updated_at')} (repeats {doc.get('repeats')})",
        f"- machine: {machine.get('cpu')}, {machine.get('usable_cores')} usable cores of {machine.get('cores')}, "
        f"{machine.get('memory_gb')} GB, load {machine.get('load_avg_1m')} when written; Python {machine.get('python')}",
        f"- versions: {versions}",
        "",
        "| workload | baseline | goal | ratio | goal met | measured |",
        "|---|---|---|---|---|---|",
    ]
    workloads = doc.get("workloads", {})
    for name, entry in workloads.items():
        met = "error" if entry.get("error") else ("yes" if entry.get("goal_met") else "**no**")
        quick = " (quick)" if entry.get("quick") else ""
        lines.append(f"| {entry.get('workload') or name} | {entry.get('baseline')} | {entry.get('goal')} | "
                     f"{_ratio(entry.get('ratio'))} | {met} | {entry.get('measured_at', '')}{quick} |")
    for name, entry in workloads.items():
        lines += ["", f"## {name}: {entry.get('workload')}", ""]
        if entry.get("summary"):
            lines += [entry["summary"], ""]
        if entry.get("error"):
            lines += ["Error:", "", "```", entry["error"], "```", ""]
        lines += [f"**Where the time goes:** {entry.get('where_time_goes') or 'not profiled'}", ""]
        lines += ["Raw figures:", "", "```json", orjson.dumps(entry.get("raw", {}), option=orjson.OPT_INDENT_2).decode(), "```"]
    return "\n".join(lines) + "\n"
