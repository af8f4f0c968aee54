"""RESULTS.md from the results document."""
from __future__ import annotations

import orjson


def _ratio(value, spread=None) -> str:
    if value is None:
        return "n/a"
    return f"{value:g}x" + (f" ({spread[0]:g}-{spread[1]:g})" if spread else "")


def render_markdown(doc: dict) -> str:
    machine = doc.get("machine", {})
    commit = doc.get("commit", {})
    kind = {"whole": "one whole `make bench` run", "partial": "a partial run (`--only` / `--quick`): not the "
            "whole benchmark", "gpu": "`make bench-gpu`"}.get(doc.get("kind"), doc.get("kind"))
    versions = ", ".join(f"{k} {v}" for k, v in machine.get("versions", {}).items())
    lines = [
        "# Benchmark results",
        "",
        "Written by `make bench` (`python -m bench`); do not edit by hand. Each workload runs the project's path and "
        "a named baseline on the same input in the same run; figures are medians of repeated runs, and the ratio "
        "(baseline time / project time) is what to read on this shared, noisy machine.",
        "",
        f"- run: {kind}, started {doc.get('started_at')}, finished {doc.get('updated_at')} (repeats "
        f"{doc.get('repeats')}{', quick inputs' if doc.get('quick') else ''})",
        f"- commit: {commit.get('sha')} on {commit.get('branch')}"
        f"{' (with uncommitted changes)' if commit.get('dirty') else ''}",
        f"- machine: {machine.get('cpu')}, {machine.get('usable_cores')} usable cores of {machine.get('cores')}, "
        f"{machine.get('memory_gb')} GB, load {machine.get('load_avg_1m')} when written; "
        f"Python {machine.get('python')}; "
        f"GPU: {machine.get('gpu') or 'none'}",
        f"- versions: {versions}",
        *(["- not in this run, each with its own budget: " + ", ".join(
            f"{name} (`python -m bench --only {name}`, bench/RESULTS-{name}.md)" for name in doc["own_budget"])]
          if doc.get("kind") == "whole" and doc.get("own_budget") else []),
        "",
        "Ratios are the median over repeats of (baseline / project) from interleaved runs; the spread (lowest-highest "
        "repeat) follows in brackets.",
        "",
        "| workload | baseline | goal | ratio | goal met | measured |",
        "|---|---|---|---|---|---|",
    ]
    workloads = doc.get("workloads", {})
    for name, entry in workloads.items():
        met = "error" if entry.get("error") else ("yes" if entry.get("goal_met") else "**no**")
        quick = " (quick)" if entry.get("quick") else ""
        lines.append(f"| {entry.get('workload') or name} | {entry.get('baseline')} | {entry.get('goal')} | "
                     f"{_ratio(entry.get('ratio'), entry.get('ratio_spread'))} | {met} | "
                     f"{entry.get('measured_at', '')}{quick} |")
    missed = [(name, e) for name, e in workloads.items() if not e.get("goal_met") and not e.get("error")]
    if missed:
        lines += ["", "## Goals missed, and why", ""]
        lines += [f"- **{name}**: {e.get('why_missed') or 'see its section'}" for name, e in missed]
    for name, entry in workloads.items():
        lines += ["", f"## {name}: {entry.get('workload')}", ""]
        if entry.get("summary"):
            lines += [entry["summary"], ""]
        if entry.get("error"):
            lines += ["Error:", "", "```", entry["error"], "```", ""]
        lines += [f"**Where the time goes:** {entry.get('where_time_goes') or 'not profiled'}", ""]
        raw = orjson.dumps(entry.get("raw", {}), option=orjson.OPT_INDENT_2).decode()
        lines += ["Raw figures:", "", "```json", raw, "```"]
    return "\n".join(lines) + "\n"
