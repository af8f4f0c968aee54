"""`cl cycle`: one idempotent pass of every step that is due.

Steps, in order: curate (enough new rated turns since the last snapshot), train (train + eval + gate on a
snapshot no adapter was trained on), eval (the champion's latest full evaluation is too old), drift (new
interactions since the last check), ab (a test runs and new turns arrived), health (the champion got new
turns, or changed). What each step last saw is kept in `logs/cycle_state.json`, so a second run with nothing
new does nothing. One cycle at a time (workspace lock 'cycle'); each run logs a `cycle` event and, when a step
ran, writes `logs/reports/cycle_<ts>.md`.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from .. import registry
from ..core.errors import CLError, InputError, LockHeldError, NothingToDo
from ..core.records import helpful_verdict, parse_time, utc_now
from ..core.settings import Settings
from ..storage.store import atomic_write_bytes, atomic_write_json, read_json, workspace_lock
from .workflow import CollectingEvents, LoopOptions, describe_curate, run_loop

STEPS = ("curate", "train", "eval", "drift", "ab", "health")
RAN, SKIPPED, FAILED = "ran", "skipped", "failed"
Say = Callable[[str], None]
NOTE = "cl cycle"  # stored with the snapshots and adapters a cycle makes


class CycleRunning(NothingToDo):
    """Another cycle holds the lock: not a failure, the running one does the work."""


@dataclass
class Due:
    step: str
    due: bool
    reason: str


@dataclass
class Outcome:
    step: str
    status: str  # ran | skipped | failed
    reason: str  # why it was due (or not)
    summary: str = ""
    details: dict = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"step": self.step, "status": self.status, "reason": self.reason, "summary": self.summary,
                "details": self.details, "seconds": round(self.seconds, 2)}


def parse_steps(text: str | None) -> tuple[str, ...]:
    """'curate,drift' -> ('curate', 'drift') in cycle order; None or '' = every step."""
    if not text:
        return STEPS
    wanted = {s.strip().lower() for s in text.split(",") if s.strip()}
    unknown = sorted(wanted - set(STEPS))
    if unknown:
        raise InputError(f"unknown cycle step(s): {', '.join(unknown)}", f"choose from {','.join(STEPS)}")
    return tuple(s for s in STEPS if s in wanted)


# --- what the workspace looks like now -------------------------------------------------------------------
def state_path(settings: Settings) -> Path:
    return settings.logs_dir / "cycle_state.json"


def log_mark(settings: Settings) -> list[int]:
    """Size and mtime of the raw log: changes with every appended turn or feedback (and every rewrite)."""
    try:
        stat = settings.raw_log.stat()
    except FileNotFoundError:
        return [0, 0]
    return [stat.st_size, stat.st_mtime_ns]


def new_rated_count(settings: Settings, doc: dict) -> int:
    """Rated interactions that are new since the last snapshot's cursor (or got their rating since)."""
    from ..capture.ingest import iter_interactions
    from ..curate import moment_of as _moment
    from ..curate import previous_cursor, scan_feedback

    cursor = previous_cursor(doc["snapshots"])
    scan = scan_feedback(settings.raw_log, cursor)
    count = 0
    for interaction in iter_interactions(settings):
        moment = _moment(interaction.recorded_at or interaction.created_at)
        if moment is None or not (cursor.new_interaction(moment, interaction.id) or interaction.id in scan.late):
            continue
        late = scan.feedback.get(interaction.id)
        feedback = interaction.feedback.merged(late) if interaction.id in scan.feedback else interaction.feedback
        if helpful_verdict(feedback, settings.curate.helpful_threshold,
                           settings.curate.unhelpful_threshold) != "unrated":
            count += 1
    return count


def untrained_snapshot(doc: dict) -> str | None:
    """The newest snapshot, when no adapter was trained on it (older ones are covered by its replay)."""
    latest = registry.latest_snapshot(doc)
    if latest is None:
        return None
    trained = {a.snapshot_id for a in registry.adapters(doc)}
    return None if latest["id"] in trained else latest["id"]


def latest_eval_time(doc: dict) -> datetime | None:
    evals = registry.registered_adapter(doc, doc["champion"]).evals
    times = [parse_time(e["created_at"]) for e in evals if isinstance(e, dict) and isinstance(e.get("created_at"), str)]
    return max(times) if times else None


# --- due rules (pure on what was read) ------------------------------------------------------------------
def curate_due(new_rated: int, minimum: int) -> Due:
    if new_rated >= minimum:
        return Due("curate", True, f"{new_rated} new rated interaction(s) since the last snapshot (threshold "
                                   f"{minimum})")
    return Due("curate", False, f"{new_rated} new rated interaction(s) since the last snapshot, fewer than {minimum}")


def train_due(snapshot: str | None, failed_snapshot: str | None, curate_pending: bool) -> Due:
    if snapshot is None and curate_pending:
        return Due("train", True, "after curate: the new snapshot has no adapter yet")
    if snapshot is None:
        return Due("train", False, "every snapshot has an adapter trained on it")
    if snapshot == failed_snapshot:
        return Due("train", False, f"training on snapshot {snapshot} failed in an earlier cycle: run 'cl train' by "
                                   f"hand")
    return Due("train", True, f"snapshot {snapshot} has no adapter trained on it")


def eval_due(last: datetime | None, max_age_days: int, now: datetime, who: str) -> Due:
    if last is None:
        return Due("eval", True, f"{who} has never been evaluated")
    age = now - last
    if age > timedelta(days=max_age_days):
        return Due("eval", True, f"{who}'s latest evaluation is {age.days} day(s) old (max {max_age_days})")
    return Due("eval", False, f"{who} was evaluated {age.days} day(s) ago (max {max_age_days})")


def watch_due(step: str, seen: dict | None, mark: list[int], champion: str | None, what: str) -> Due:
    """Due when the raw log or the champion changed since this step last ran."""
    if seen is None:
        return Due(step, True, f"{what} has not run in a cycle yet")
    if seen.get("log") != mark:
        return Due(step, True, "new interactions or feedback since the last check")
    if seen.get("champion", "?") != champion:
        return Due(step, True, "the champion changed since the last check")
    return Due(step, False, "nothing new since the last check")


# --- the runner -----------------------------------------------------------------------------------------
class Cycle:
    def __init__(self, settings: Settings, steps: tuple[str, ...], say: Say | None = None):
        self.settings = settings
        self.steps = steps
        self.say = say or (lambda _: None)
        self.state = read_json(state_path(settings), default={}) or {}
        self.state.setdefault("steps", {})
        self.now = datetime.now(UTC)

    # which steps are due, given the workspace as it is right now
    def due(self, step: str, pending: set[str] = frozenset()) -> Due:
        settings, doc = self.settings, registry.load(self.settings)
        seen = self.state["steps"].get(step)
        if step == "curate":
            return curate_due(new_rated_count(settings, doc), settings.cycle.min_new_rated)
        if step == "train":
            return train_due(untrained_snapshot(doc), self.state.get("train_failed_snapshot"), "curate" in pending)
        if step == "eval":
            eval_file = settings.resolve_in_home(settings.eval.eval_file)
            if doc["champion"] is None:
                return Due("eval", False, "the base model is serving: no champion to re-evaluate")
            if not eval_file.is_file():
                return Due("eval", False, f"no eval file at {eval_file} (see 'cl eval --help')")
            return eval_due(latest_eval_time(doc), settings.cycle.eval_max_age_days, self.now, doc["champion"])
        if log_mark(settings) == [0, 0]:
            return Due(step, False, "no interactions logged yet")
        if step == "ab":
            from ..monitor.ab import running_test

            test = running_test(settings)
            if test is None:
                return Due("ab", False, "no A/B test is running")
            return watch_due("ab", seen, log_mark(settings), doc["champion"], f"A/B test {test['id']}")
        if step == "health" and doc["champion"] is None:
            return Due("health", False, "the base model is serving: no champion to judge")
        return watch_due(step, seen, log_mark(settings), doc["champion"], f"the {step} check")

    def plan(self) -> list[Due]:
        """What a run would do now (train after a due curate is assumed to follow it)."""
        plans, pending = [], set()
        for step in self.steps:
            due = self.due(step, pending)
            plans.append(due)
            if due.due:
                pending.add(step)
        return plans

    def run(self) -> list[Outcome]:
        outcomes = []
        for step in self.steps:
            try:
                due = self.due(step)
            except CLError as exc:
                outcomes.append(Outcome(step, FAILED, "could not tell whether it is due", str(exc)))
                continue
            if not due.due:
                outcomes.append(Outcome(step, SKIPPED, due.reason))
                continue
            self.say(f"{step}: running ({due.reason})")
            outcomes.append(self.run_step(step, due.reason))
        return outcomes

    def run_step(self, step: str, reason: str) -> Outcome:
        mark = log_mark(self.settings)  # taken before: turns appended while the step runs make it due next time
        started = time.perf_counter()
        try:
            summary, details = getattr(self, f"step_{step}")()
            outcome = Outcome(step, RAN, reason, summary, details)
        except NothingToDo as exc:
            outcome = Outcome(step, RAN, reason, exc.message)
        except CLError as exc:
            outcome = Outcome(step, FAILED, reason, str(exc))
        outcome.seconds = time.perf_counter() - started
        champion = registry.load(self.settings)["champion"]  # after: its own rollback or promotion is not news to it
        self.state["steps"][step] = {"at": utc_now(), "log": mark, "champion": champion, "status": outcome.status}
        return outcome

    # the steps; each returns (one-line summary, small JSON-able details)
    def step_curate(self) -> tuple[str, dict]:
        manifest = run_loop(self.settings, LoopOptions(curate=True, note=NOTE))["curate"]
        return describe_curate(manifest), {"snapshot": manifest.get("id"), "status": manifest["status"]}

    def step_train(self) -> tuple[str, dict]:
        snapshot = untrained_snapshot(registry.load(self.settings))
        options = LoopOptions(train=True, evaluate=True, snapshot=snapshot, note=NOTE,
                              promote=self.settings.cycle.gate_promote)
        events = CollectingEvents()
        try:
            results = run_loop(self.settings, options, events)
        except CLError:
            self._remember_training(events, snapshot)
            raise
        self._remember_training(events, snapshot)
        report, version = results["eval"], results["train"]["version"]
        subject, decision = report["subject"], report.get("decision")
        verdict = "promoted" if report["promoted"] else ("kept as candidate" + (": " + decision["summary"] if decision
                                                                                else ""))
        summary = f"adapter {version} trained on {snapshot}; accuracy {subject['passed']}/{subject['total']}; {verdict}"
        return summary, {"snapshot": snapshot, "version": version, "accuracy": subject.get("accuracy"),
                         "promoted": report["promoted"]}

    def _remember_training(self, events: CollectingEvents, snapshot: str | None) -> None:
        """A snapshot whose training failed is not tried again by later cycles; one that trained clears that."""
        if "train" in events.stages("finished"):
            self.state.pop("train_failed_snapshot", None)
        elif "train" in events.stages("started"):
            self.state["train_failed_snapshot"] = snapshot

    def step_eval(self) -> tuple[str, dict]:
        from ..evaluate import evaluate_and_gate

        champion = registry.load(self.settings)["champion"]
        report = evaluate_and_gate(self.settings, candidate=champion, against="none", promote=False)
        subject = report["subject"]
        return (f"{champion}: accuracy {subject['passed']}/{subject['total']}",
                {"version": champion, "accuracy": subject.get("accuracy"),
                 "general_accuracy": subject.get("general_accuracy")})

    def step_drift(self) -> tuple[str, dict]:
        try:
            from ..monitor.drift import check_drift
        except ImportError:
            raise CLError("drift checks are not available in this installation") from None
        result = check_drift(self.settings)
        return f"drift status: {result['status']}", {"status": result["status"]}

    def step_ab(self) -> tuple[str, dict]:
        from ..monitor.ab import CANDIDATE, CHAMPION, running_test, status_report, stop_test

        test = running_test(self.settings)
        if self.settings.cycle.ab_promote and status_report(self.settings, test)["would_promote"]:
            report = stop_test(self.settings, promote=True)
        else:
            report = status_report(self.settings, test)
        stats = report["stats"]
        ci = stats["ci95"]
        summary = (f"test {test['id']}: {test['candidate']} {_rate(stats[CANDIDATE])} vs {test['champion'] or 'base'} "
                   f"{_rate(stats[CHAMPION])}, diff {stats['difference'] * 100:+.1f} points "
                   f"[{ci[0] * 100:+.1f}, {ci[1] * 100:+.1f}], p={stats['p_value']:.3g}")
        if report.get("promoted"):
            summary += f"; stopped and promoted {test['candidate']}"
        elif report["would_promote"]:
            summary += "; promotion criteria hold (cycle.ab_promote is off: run 'cl ab stop --promote')"
        return summary, {"test_id": test["id"], "difference": stats["difference"], "p_value": stats["p_value"],
                         "would_promote": report["would_promote"], "promoted": bool(report.get("promoted"))}

    def step_health(self) -> tuple[str, dict]:
        from ..monitor.health import check_health

        report = check_health(self.settings)
        summary = f"{report['champion']}: {report['verdict']}"
        if report["rolled_back"]:
            summary += f", rolled back to {report['predecessor'] or 'base'}"
        return summary + " (" + "; ".join(report["reasons"]) + ")", {
            "verdict": report["verdict"], "champion": report["champion"], "rolled_back": report["rolled_back"]}

    def save_state(self) -> None:
        atomic_write_json(state_path(self.settings), self.state)


def _rate(arm: dict) -> str:
    rate = arm["helpful_rate"]
    return f"{'-' if rate is None else f'{rate:.0%}'} of {arm['rated']}"


def _holder(settings: Settings) -> str:
    owner = settings.lock_dir / "cycle.owner"
    try:
        return owner.read_text(encoding="utf-8").strip() or "another process"
    except OSError:
        return "another process"


# --- entry points ---------------------------------------------------------------------------------------
def plan_cycle(settings: Settings, steps: tuple[str, ...] = STEPS) -> list[Due]:
    """`--dry-run`: what is due now; writes nothing."""
    return Cycle(settings, steps).plan()


def run_cycle(settings: Settings, steps: tuple[str, ...] = STEPS, say: Say | None = None) -> dict:
    """Run every due step (one cycle at a time), log a `cycle` event and write a report when something ran.

    Raises CycleRunning (exit 0) when another cycle holds the lock."""
    try:
        with workspace_lock(settings.lock_dir, "cycle"):
            cycle = Cycle(settings, steps, say)
            started = utc_now()
            outcomes = cycle.run()
            cycle.save_state()
    except LockHeldError:
        raise CycleRunning(f"a cycle is already running ({_holder(settings)})", "this run did nothing") from None
    ran = [o for o in outcomes if o.status != SKIPPED]
    report = write_report(settings, started, outcomes) if ran else None
    registry.log_event(
        settings, "cycle", steps=list(steps), ran=[o.step for o in ran], nothing_due=not ran,
        outcomes={o.step: {"status": o.status, "summary": o.summary or o.reason} for o in outcomes},
        failed=[o.step for o in outcomes if o.status == FAILED],
        report=str(report.relative_to(settings.home)) if report else None,
    )
    return {"started_at": started, "steps": list(steps), "outcomes": [o.to_dict() for o in outcomes],
            "nothing_due": not ran, "failed": [o.step for o in outcomes if o.status == FAILED],
            "report": str(report) if report else None}


def render_report(started: str, outcomes: list[Outcome]) -> str:
    """The Markdown report of one cycle."""
    lines = [f"# Cycle {started}", "", "| step | status | why | outcome | seconds |", "|---|---|---|---|---|"]
    for o in outcomes:
        cells = [o.step, o.status, o.reason, o.summary or "-", f"{o.seconds:.1f}"]
        lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    failed = [o.step for o in outcomes if o.status == FAILED]
    lines += ["", f"Failed: {', '.join(failed)}." if failed else "No step failed.", ""]
    return "\n".join(lines)


def write_report(settings: Settings, started: str, outcomes: list[Outcome]) -> Path:
    stamp = parse_time(started).strftime("%Y%m%dT%H%M%S%fZ")
    path = settings.logs_dir / "reports" / f"cycle_{stamp}.md"
    atomic_write_bytes(path, render_report(started, outcomes).encode("utf-8"))
    return path
