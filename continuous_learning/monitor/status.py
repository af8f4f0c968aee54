"""`cl status` data: one JSON-able picture of the workspace, gathered fast and without torch.

Traffic and feedback come from one streaming pass over the raw log (only small counters are kept); adapters
and evals from the registry; helpful rates per adapter from `logs/feedback_metrics.json`; the latest outcome of
every stage from `logs/learning_events.jsonl`.
"""
from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from .. import registry
from ..core.errors import CLError
from ..core.records import Feedback, FeedbackEvent, Interaction, helpful_verdict, parse_time
from ..core.settings import Settings
from ..storage.store import ReadReport, iter_jsonl, read_json, read_log

TRACKED_EVENTS = ("snapshot_created", "adapter_trained", "train_failed", "eval", "promote", "rollback", "drift",
                  "cycle",
                  "health_rollback", "ab_start", "ab_stop")
RATED = ("helpful", "unhelpful", "neutral", "corrected")
RECENT_EVENTS = 10


# --- pure helpers ----------------------------------------------------------------------------------------
def helpful_rate(counts: dict) -> float | None:
    """Helpful share of the rated turns in a feedback counter (None when nothing was rated)."""
    rated = sum(int(counts.get(k) or 0) for k in RATED)
    return int(counts.get("helpful") or 0) / rated if rated else None


def adapter_feedback(metrics: dict) -> dict[str, dict]:
    """`adapter:<version>` counters of feedback_metrics.json, keyed by version ('base' = no adapter)."""
    out = {}
    for scope, counts in metrics.items():
        if scope.startswith("adapter:") and isinstance(counts, dict):
            rated = sum(int(counts.get(k) or 0) for k in RATED)
            out[scope.removeprefix("adapter:")] = {**counts, "rated": rated, "helpful_rate": helpful_rate(counts)}
    return out


def event_outcome(event: dict) -> str:
    """A short human line for one learning event."""
    kind = event.get("event")
    get = event.get
    if kind == "snapshot_created":
        return f"snapshot {get('snapshot')}: {get('train_examples')} train / {get('eval_examples')} eval examples"
    if kind == "adapter_trained":
        loss = get("final_loss")
        return f"adapter {get('version')} trained" + (f", final loss {loss:.3f}" if isinstance(loss, (int, float))
                                                      else "")
    if kind == "train_failed":
        return f"training failed: {get('error') or get('reason') or get('message') or '?'}"
    if kind == "eval":
        acc = get("accuracy")
        return f"{get('version') or 'base'} evaluated" + (f": accuracy {acc:.0%}" if isinstance(acc, (int, float))
                                                          else "")
    if kind in ("promote", "rollback", "health_rollback"):
        return f"{get('from') or 'base'} -> {get('to') or 'base'}" + (f" ({get('reason')})" if get("reason") else "")
    if kind == "drift":
        worst = get("worst_feature")
        return f"{get('status')}" + (f" (largest PSI: {worst})" if worst else "")
    if kind == "cycle":
        if get("nothing_due"):
            return "nothing due"
        failed = get("failed") or []
        return f"ran {', '.join(get('ran') or []) or '-'}" + (f"; failed: {', '.join(failed)}" if failed else "")
    if kind == "ab_start":
        traffic = get("traffic")
        return f"{get('candidate')} vs {get('champion') or 'base'}" + (f", {traffic:.0%} of sessions"
                                                                       if isinstance(traffic, (int, float)) else "")
    if kind == "ab_stop":
        return f"{get('candidate')} vs {get('champion') or 'base'}: " + ("candidate promoted" if get("promoted")
                                                                         else "not promoted")
    return ""


def day_series(first_day: date, days: int) -> list[str]:
    return [(first_day + timedelta(days=i)).isoformat() for i in range(days)]


# --- the raw log ----------------------------------------------------------------------------------------
class Traffic:
    """Counters of one pass over the raw log: totals, per day for the last days, per A/B arm."""

    def __init__(self, settings: Settings, now: datetime, days: int, ab_since: datetime | None):
        self.helpful_threshold = settings.curate.helpful_threshold
        self.unhelpful_threshold = settings.curate.unhelpful_threshold
        self.first_day = (now - timedelta(days=days - 1)).date()
        self.days = day_series(self.first_day, days)
        self.ab_since = ab_since
        self.total = 0
        self.feedback_events = 0
        self.verdicts: dict[str, int] = {}
        # id -> (day key or None, ab arm or None, joined feedback) of turns that a later rating can still move
        self.open: dict[str, tuple[str | None, str | None, Feedback]] = {}
        self.per_day = {d: {"turns": 0, **{k: 0 for k in RATED}} for d in self.days}
        self.arms: dict[str, dict] = {}

    def verdict(self, feedback: Feedback) -> str:
        return helpful_verdict(feedback, self.helpful_threshold, self.unhelpful_threshold)

    def add_interaction(self, record: Interaction) -> None:
        self.total += 1
        feedback = record.feedback
        moment = parse_time(record.created_at)  # the shared parser checked it
        day = moment.date().isoformat() if moment.date() >= self.first_day else None
        if day is not None and day not in self.per_day:
            day = None  # dated in the future
        arm = record.ab_arm if record.ab_arm and (self.ab_since is None or moment >= self.ab_since) else None
        if day:
            self.per_day[day]["turns"] += 1
        if arm:
            self.arms.setdefault(arm, {"turns": 0, **{k: 0 for k in RATED}})["turns"] += 1
        self._move(None, self.verdict(feedback), day, arm)
        self.open[record.id] = (day, arm, feedback)

    def add_feedback(self, record: FeedbackEvent) -> None:
        self.feedback_events += 1
        key = record.interaction_id
        if key not in self.open:
            return
        day, arm, before = self.open[key]
        after = before.merged(record.feedback)
        self._move(self.verdict(before), self.verdict(after), day, arm)
        self.open[key] = (day, arm, after)

    def _move(self, old: str | None, new: str, day: str | None, arm: str | None) -> None:
        for counts in (self.verdicts, self.per_day.get(day) if day else None, self.arms.get(arm) if arm else None):
            if counts is None:
                continue
            if old is not None:
                counts[old] = counts.get(old, 0) - 1
            counts[new] = counts.get(new, 0) + 1

    def summary(self) -> dict:
        rated = sum(self.verdicts.get(k, 0) for k in RATED)
        per_day = [{"day": d, **{k: v for k, v in c.items() if k in ("turns", *RATED)},
                    "rated": sum(c[k] for k in RATED),
                    "helpful_rate": helpful_rate(c)} for d, c in self.per_day.items()]
        arms = {arm: {"turns": c["turns"], "rated": sum(c.get(k, 0) for k in RATED), "helpful": c.get("helpful", 0),
                      "helpful_rate": helpful_rate(c)} for arm, c in sorted(self.arms.items())}
        return {
            "total": self.total,
            "rated": rated,
            "helpful_rate": helpful_rate(self.verdicts),
            "verdicts": {k: self.verdicts.get(k, 0) for k in (*RATED, "unrated")},
            "feedback_events": self.feedback_events,
            "per_day": per_day,
            "ab_arms": arms,
        }


def scan_raw_log(settings: Settings, now: datetime, days: int, ab_since: datetime | None) -> tuple[dict, ReadReport]:
    traffic, report = Traffic(settings, now, days, ab_since), ReadReport()
    for _, record in read_log(settings.raw_log, report):
        if isinstance(record, Interaction):
            traffic.add_interaction(record)
        else:
            traffic.add_feedback(record)
    return traffic.summary(), report


# --- the learning events ---------------------------------------------------------------------------------
def scan_events(path: Path) -> dict:
    """The last event of each tracked kind and the most recent few of any kind."""
    latest: dict[str, dict] = {}
    recent: deque = deque(maxlen=RECENT_EVENTS)
    for _, record in iter_jsonl(path):
        if not isinstance(record, dict) or record.get("event") is None:
            continue
        kind = record["event"]
        if kind in TRACKED_EVENTS:
            latest[kind] = record
        if kind != "ingested":
            recent.append(record)
    return {
        "latest": {k: {"at": e.get("created_at"), "outcome": event_outcome(e), "details": _details(e)} for k,
                   e in latest.items()},
        "recent": [{"at": e.get("created_at"), "event": e.get("event"), "outcome": event_outcome(e)} for e in recent],
    }


def _details(event: dict) -> dict:
    return {k: v for k, v in event.items() if k not in ("schema_version", "type", "id", "created_at", "event")}


# --- the registry ---------------------------------------------------------------------------------------
def adapters_summary(doc: dict, feedback: dict[str, dict]) -> list[dict]:
    from ..registry import adapters_by_version

    rows = []
    for entry in adapters_by_version(doc):
        version = entry.version
        last = entry.latest_eval or {}
        rows.append({
            "version": version,
            "status": entry.status,
            "created_at": entry.created_at,
            "snapshot": entry.snapshot_id,
            "final_loss": entry.metrics.get("final_loss"),
            "eval_accuracy": last.get("accuracy"),
            "general_accuracy": last.get("general_accuracy"),
            "evals": len(entry.evals),
            "helpful_rate": (feedback.get(version) or {}).get("helpful_rate"),
            "rated": (feedback.get(version) or {}).get("rated", 0),
        })
    return rows


# --- disk -------------------------------------------------------------------------------------------------
def folder_bytes(path: Path) -> int:
    """Bytes of the files under a folder (links not followed); 0 when it does not exist."""
    total = 0
    stack = [path]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
            except OSError:
                continue
    return total


def disk_use(settings: Settings) -> dict:
    raw_dir = settings.raw_log.parent
    return {
        "logs": folder_bytes(settings.logs_dir),
        "data_raw": folder_bytes(raw_dir),
        "data_curated": folder_bytes(settings.curated_dir),
        "adapters": folder_bytes(settings.adapters_dir),
    }


# --- A/B --------------------------------------------------------------------------------------------------
def read_optional(path: Path, notes: list[str]) -> Any:
    """A JSON file that may be missing; a damaged one becomes a note, never a failed status."""
    try:
        return read_json(path)
    except CLError as exc:
        notes.append(exc.message)
        return None


def _started(ab: dict | None) -> datetime | None:
    try:
        return parse_time(str(ab["started_at"])) if ab and ab.get("started_at") else None
    except ValueError:
        return None


# --- everything -------------------------------------------------------------------------------------------
def collect_status(settings: Settings, days: int = 14, now: datetime | None = None) -> dict[str, Any]:
    """The whole status as a JSON-able dict (also served by the service's admin status)."""
    now = now or datetime.now(UTC)
    notes: list[str] = []
    try:
        doc = registry.load(settings)
    except CLError as exc:
        doc = registry.empty_registry()
        notes.append(f"registry unreadable: {exc.message}")
    metrics = read_optional(settings.feedback_metrics, notes)
    feedback = adapter_feedback(metrics if isinstance(metrics, dict) else {})
    ab = read_optional(settings.adapters_dir / "ab_test.json", notes)
    ab = ab if isinstance(ab, dict) else None
    traffic, report = scan_raw_log(settings, now, days, _started(ab))
    if report.skipped or report.torn_tail:
        notes.append(f"raw log: {report.skipped} unreadable or wrongly shaped line(s) skipped"
                     + (", torn last line" if report.torn_tail else ""))
    events = scan_events(settings.learning_events)
    if ab is not None:
        ab = {**ab, "arms": traffic["ab_arms"]}
    return {
        "home": str(settings.home),
        "generated_at": now.isoformat(timespec="seconds").replace("+00:00", "Z"),
        "base_model": settings.model.base_model,
        "interactions": {k: v for k, v in traffic.items() if k != "ab_arms"},
        "champion": doc.get("champion"),
        "adapters": adapters_summary(doc, feedback),
        "base_helpful_rate": (feedback.get("base") or {}).get("helpful_rate"),
        "feedback_by_adapter": feedback,
        "snapshots": len(doc["snapshots"]),
        "events": events,
        "drift": events["latest"].get("drift"),
        "ab_test": ab,
        "disk": disk_use(settings),
        "notes": notes,
    }


def human_bytes(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"


def adapters_by_status(rows: Iterable[dict], statuses: tuple[str, ...]) -> list[dict]:
    return [r for r in rows if r["status"] in statuses]
