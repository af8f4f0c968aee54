"""Stage 5, take stock: the run's counts and the manifest they go in; and the end of the run, having written
nothing, when nothing is new (every selected turn was a duplicate, capped, or capped already last time)."""
from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from ..core.records import SCHEMA_VERSION
from ..core.settings import Settings
from .examples import KIND_WEIGHTS
from .feedback import FeedbackScan
from .selection import DROP_REASONS, Rules
from .state import CurateContext, Pool


def take_stock(pool: Pool, ctx: CurateContext) -> Pool:
    """`manifest` with the counts so far; or `result`, the "nothing_new" manifest, when there is nothing new."""
    settings, examples = ctx.settings, pool.examples
    capped_tools = [examples.tool_of(row) for row in pool.capped.tolist()]
    counts = _counts(pool.tally, ctx.scan, pool.exact, pool.near, capped_tools)
    manifest = {
        "schema_version": SCHEMA_VERSION, "type": "snapshot_manifest", "status": "nothing_new", "id": None,
        "created_at": _iso(ctx.now), "note": ctx.note, "mode": "full" if ctx.full else "incremental",
        "source": str(settings.raw_log.relative_to(settings.home)), "counts": counts,
        "settings": _settings_used(settings, ctx.rules), "previous_cursor": ctx.cursor.to_dict(),
    }
    deferred = set(ctx.cursor.deferred_ids)
    if all(deferred.issuperset(examples.record(row)["source_ids"]) for row in pool.rows.tolist()):
        message = f"nothing new to curate: {_why_nothing(counts, settings.raw_log)}"  # capped last time: not news
        return replace(pool, result={**manifest, "cursor": ctx.cursor.to_dict(), "message": message})
    return replace(pool, manifest=manifest)


def _counts(tally: Counter, scan: FeedbackScan, exact: int, near: int, capped_tools: list[str | None]) -> dict:
    """The manifest's `counts`; the new, replayed, train and eval numbers are filled in by the write stage."""
    return {
        "lines": scan.lines,
        "bad_lines": scan.report.skipped,
        "torn_tail": scan.report.torn_tail,
        "bad_records": scan.bad_records + tally["bad_records"],
        "interactions": tally["interactions"],
        "feedback_events": scan.events,
        "orphan_feedback": tally["orphan_feedback"],
        "new_interactions": tally["new_interactions"],
        "late_feedback": tally["late_feedback"],
        "late_feedback_already_in_snapshot": tally["late_feedback_already_in_snapshot"],
        "deferred": tally["deferred"],
        "selected": {k: tally[f"selected.{k}"] for k in KIND_WEIGHTS},
        "dropped": {r: tally[f"dropped.{r}"] for r in DROP_REASONS},
        "deduped": {"exact": exact, "near": near},
        "capped": {"total": len(capped_tools), "by_domain": dict(sorted(Counter(capped_tools).items()))},
        "new_examples": 0,
        "replayed": 0,
        "replay_sources_missing": tally["replay_sources_missing"],
        "train": 0,
        "eval": 0,
    }


def _settings_used(settings: Settings, rules: Rules) -> dict:
    return {**dataclasses.asdict(settings.curate), "include_unrated": rules.include_unrated}


def _why_nothing(counts: dict, log: Path) -> str:
    if counts["lines"] == 0:
        return f"no interactions logged yet ({log} is empty or missing)"
    considered = counts["new_interactions"] + counts["late_feedback"]
    if considered == 0:
        return "no interactions or feedback since the last snapshot"
    reasons = ", ".join(f"{n} {r}" for r, n in counts["dropped"].items() if n)
    return f"{considered} new turn(s), none selected ({reasons or 'all capped or duplicates'})"


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
