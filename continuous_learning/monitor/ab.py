"""A/B tests in the chat: a share of new sessions is answered by a candidate adapter, feedback is compared per arm.

The state lives in `adapters/ab_test.json` (written atomically under the registry lock):
`{"id", "candidate", "champion", "traffic", "started_at", "status": "running"|"stopped", ...}`.
Statistics (`assign_arm`, `two_proportion_z`, `diff_ci`, `promotion_decision`) are pure functions.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from statistics import NormalDist

from .. import registry
from ..core.errors import CLError, InputError, NothingToDo, RegistryError
from ..core.records import Interaction, helpful_verdict, new_id, parse_time, utc_now
from ..core.settings import ABConfig, Settings
from ..storage.store import atomic_write_json, joined_interactions, read_json

CHAMPION, CANDIDATE = "champion", "candidate"
ARMS = (CHAMPION, CANDIDATE)
RUNNING, STOPPED = "running", "stopped"
UNUSABLE = ("failed", "tainted")
_NORMAL = NormalDist()


# --- pure statistics ------------------------------------------------------------------------------------
def assign_arm(session_id: str, test_id: str, traffic: float) -> str:
    """The arm of one chat session: a hash of (test id, session id) mapped to [0, 1), below `traffic` = candidate.

    Deterministic, so a session keeps its arm; salted by the test id, so each test draws a fresh split."""
    digest = hashlib.sha256(f"{test_id}\x00{session_id}".encode()).digest()
    point = int.from_bytes(digest[:8], "big") / 2**64
    return CANDIDATE if point < traffic else CHAMPION


def two_proportion_z(x1: int, n1: int, x2: int, n2: int, alternative: str = "two-sided") -> tuple[float, float]:
    """(z, p) of the pooled two-proportion z-test of p1 vs p2.

    `alternative`: "two-sided", "greater" (p1 > p2) or "less" (p1 < p2). No data or no variance: (0, 1)."""
    if n1 <= 0 or n2 <= 0:
        return 0.0, 1.0
    pooled = (x1 + x2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0:
        return 0.0, 1.0
    z = (x1 / n1 - x2 / n2) / se
    if alternative == "two-sided":
        p = 2 * _NORMAL.cdf(-abs(z))
    elif alternative == "greater":
        p = _NORMAL.cdf(-z)
    elif alternative == "less":
        p = _NORMAL.cdf(z)
    else:
        raise ValueError(f"unknown alternative {alternative!r}")
    return z, min(1.0, p)


def diff_ci(x1: int, n1: int, x2: int, n2: int, level: float = 0.95) -> tuple[float, float, float]:
    """(p1 - p2, low, high): the difference of two proportions with its Wald (unpooled) confidence interval."""
    if n1 <= 0 or n2 <= 0:
        return 0.0, -1.0, 1.0
    p1, p2 = x1 / n1, x2 / n2
    half = _NORMAL.inv_cdf(0.5 + level / 2) * math.sqrt(p1 * (1 - p1) / n1 + p2 * (1 - p2) / n2)
    diff = p1 - p2
    return diff, diff - half, diff + half


@dataclass(frozen=True)
class Tally:
    rated: int = 0
    helpful: int = 0

    @property
    def rate(self) -> float | None:
        return self.helpful / self.rated if self.rated else None

    def add(self, helpful: bool) -> Tally:
        return Tally(self.rated + 1, self.helpful + int(helpful))

    def to_dict(self) -> dict:
        return {"rated": self.rated, "helpful": self.helpful, "helpful_rate": self.rate}


def compare_arms(champion: Tally, candidate: Tally, alpha: float) -> dict:
    """Candidate minus champion: difference, its 95% CI and the two-sided z-test."""
    diff, low, high = diff_ci(candidate.helpful, candidate.rated, champion.helpful, champion.rated)
    z, p = two_proportion_z(candidate.helpful, candidate.rated, champion.helpful, champion.rated)
    return {
        CHAMPION: champion.to_dict(), CANDIDATE: candidate.to_dict(),
        "difference": diff, "ci95": [low, high], "z": z, "p_value": p, "alpha": alpha, "significant": p < alpha,
    }


def promotion_decision(stats: dict, config: ABConfig) -> tuple[bool, list[str]]:
    """Promote only with enough rated samples per arm, a significant difference and a large enough gain."""
    reasons, ok = [], True
    for arm in ARMS:
        rated = stats[arm]["rated"]
        if rated < config.min_samples:
            ok = False
            reasons.append(f"{arm} arm has {rated} rated turn(s), needs at least {config.min_samples}")
    if stats["p_value"] >= config.alpha:
        ok = False
        reasons.append(f"difference not significant: p={stats['p_value']:.3g} >= alpha={config.alpha:g}")
    if stats["difference"] < config.min_improvement - 1e-12:
        ok = False
        reasons.append(f"improvement {stats['difference'] * 100:+.1f} points is below the required "
                       f"{config.min_improvement * 100:.1f}")
    if ok:
        reasons.append(f"candidate better by {stats['difference'] * 100:+.1f} points, p={stats['p_value']:.3g}, "
                       f"{stats[CANDIDATE]['rated']} vs {stats[CHAMPION]['rated']} rated turns")
    return ok, reasons


# --- joining interactions with their feedback ------------------------------------------------------------
def rated_tallies(settings: Settings, key: Callable[[Interaction], Hashable | None]) -> dict[Hashable, Tally]:
    """Rated/helpful counts per `key(interaction)` (None = not counted), feedback events merged in.

    Helpful = the curate verdict 'helpful' (score >= curate.helpful_threshold, or a plain 'y'); rated = any verdict."""
    tallies: dict[Hashable, Tally] = {}
    for interaction in joined_interactions(settings.raw_log):  # wrongly shaped lines are skipped by the shared reader
        group = key(interaction)
        if group is None:
            continue
        verdict = helpful_verdict(interaction.feedback, settings.curate.helpful_threshold,
                                  settings.curate.unhelpful_threshold)
        if verdict != "unrated":
            tallies[group] = tallies.get(group, Tally()).add(verdict == "helpful")
    return tallies


def in_test(test: dict) -> Callable[[Interaction], str | None]:
    """The arm of an interaction answered during `test` by that arm's adapter version, else None."""
    start = parse_time(test["started_at"])
    end = parse_time(test["stopped_at"]) if test.get("stopped_at") else None
    versions = {CHAMPION: test["champion"], CANDIDATE: test["candidate"]}

    def arm(interaction: Interaction) -> str | None:
        if interaction.ab_arm not in versions or interaction.adapter_version != versions[interaction.ab_arm]:
            return None
        moment = parse_time(interaction.created_at)
        return interaction.ab_arm if moment >= start and (end is None or moment <= end) else None

    return arm


# --- state file ------------------------------------------------------------------------------------------
def state_file(settings: Settings):
    return settings.adapters_dir / "ab_test.json"


def load_test(settings: Settings) -> dict | None:
    """The current (or last) A/B test, or None."""
    doc = read_json(state_file(settings))
    if doc is not None and not (isinstance(doc, dict) and {"id", "candidate", "traffic", "started_at",
                                                           "status"} <= set(doc)):
        raise InputError(f"{state_file(settings)} is not an A/B test record", "delete it to start afresh")
    return doc


def stopped(test: dict, reason: str | None = None, promoted: bool = False, result: dict | None = None) -> dict:
    """The test record once stopped (pure)."""
    return {**test, "status": STOPPED, "stopped_at": utc_now(), "promoted": promoted, "result": result,
            **({"reason": reason} if reason else {})}


def running_test(settings: Settings) -> dict | None:
    test = load_test(settings)
    return test if test and test["status"] == RUNNING else None


def can_serve(test: dict | None, doc: dict) -> bool:
    """Whether a running test's candidate may still answer: registered and neither failed nor tainted (a forget
    that taints it also stops the test; this guards the moments in between and hand-edited state files)."""
    if not test or test.get("status") != RUNNING:
        return False
    entry = registry.adapter_view(doc, test.get("candidate"))
    return entry is not None and entry.can_serve


def session_arm(test: dict | None, session_id: str, session_started: str) -> str | None:
    """The arm of a chat session: only sessions started after the test began take part (no switch mid-talk)."""
    if not test or test.get("status") != RUNNING or parse_time(session_started) < parse_time(test["started_at"]):
        return None
    return assign_arm(session_id, test["id"], float(test["traffic"]))


def check_candidate(doc: dict, candidate: str) -> None:
    entry = registry.registered_adapter(doc, candidate)
    if not entry.can_serve:
        raise RegistryError(f"adapter {candidate} is {entry.status} and cannot serve", "choose another candidate")
    if doc["champion"] == candidate:
        raise InputError(f"adapter {candidate} is already the champion", "A/B-test a candidate against it instead")


def start_test(settings: Settings, candidate: str, traffic: float | None = None) -> dict:
    """Start routing `traffic` of new chat sessions to `candidate`. Refuses while another test runs."""
    from ..registry import verify_adapter_files

    traffic = settings.ab.traffic if traffic is None else traffic
    if not 0 < traffic < 1:
        raise InputError(f"--traffic must be between 0 and 1 (exclusive), got {traffic:g}", "e.g. --traffic 0.1 for "
                                                                                            "10% of new sessions")
    doc = registry.load(settings)
    check_candidate(doc, candidate)
    verify_adapter_files(settings, registry.registered_adapter(doc, candidate))
    with registry.locked(settings):
        doc = registry.load(settings)
        check_candidate(doc, candidate)
        current = load_test(settings)
        if current and current["status"] == RUNNING:
            raise CLError(f"A/B test {current['id']} ({current['candidate']} vs {current['champion'] or 'base'}) is "
                          f"already running",
                          "stop it first with 'cl ab stop'")
        test = {"id": new_id()[:8], "candidate": candidate, "champion": doc["champion"], "traffic": traffic,
                "started_at": utc_now(), "status": RUNNING}
        atomic_write_json(state_file(settings), test)
    registry.log_event(settings, "ab_start", test_id=test["id"], candidate=candidate, champion=test["champion"],
                       traffic=traffic)
    return test


def status_report(settings: Settings, test: dict | None = None) -> dict:
    """The test, the per-arm figures, the comparison and whether `cl ab stop --promote` would promote."""
    test = test or load_test(settings)
    if test is None:
        raise NothingToDo("no A/B test has been started", "start one with 'cl ab start VERSION'")
    tallies = rated_tallies(settings, in_test(test))
    stats = compare_arms(tallies.get(CHAMPION, Tally()), tallies.get(CANDIDATE, Tally()), settings.ab.alpha)
    promote, reasons = promotion_decision(stats, settings.ab)
    champion_now = registry.load(settings)["champion"]
    warnings = []
    if test["status"] == RUNNING and champion_now != test["champion"]:
        warnings.append(f"the champion changed to {champion_now or 'base'} since the test started: "
                        f"champion-arm figures count only turns answered by {test['champion'] or 'base'}")
    return {"test": test, "stats": stats, "would_promote": promote, "reasons": reasons, "warnings": warnings}


def stop_test(settings: Settings, promote: bool = False) -> dict:
    """Stop the running test; with `promote`, promote the candidate if the criteria hold (else say why not)."""
    test = running_test(settings)
    if test is None:
        raise NothingToDo("no A/B test is running", "start one with 'cl ab start VERSION'")
    report = status_report(settings, test)
    promoted = None
    if promote and report["would_promote"]:
        reason = "A/B test " + test["id"] + ": " + "; ".join(report["reasons"])
        promoted = _promote(settings, test, reason)
    with registry.locked(settings):
        current = load_test(settings)
        if not current or current["id"] != test["id"] or current["status"] != RUNNING:
            raise CLError("the A/B test changed while this command ran", "check 'cl ab status' and run it again")
        record = stopped(current, promoted=promoted is not None,
                         result={"stats": report["stats"], "reasons": report["reasons"]})
        atomic_write_json(state_file(settings), record)
    registry.log_event(
        settings, "ab_stop", test_id=test["id"], candidate=test["candidate"], champion=test["champion"],
        promoted=promoted is not None, promote_requested=promote, reasons=report["reasons"],
        champion_rated=report["stats"][CHAMPION]["rated"], candidate_rated=report["stats"][CANDIDATE]["rated"],
        difference=report["stats"]["difference"], p_value=report["stats"]["p_value"],
    )
    return {**report, "test": record, "promoted": promoted is not None, "promote_requested": promote}


def _promote(settings: Settings, test: dict, reason: str) -> dict:
    from ..registry import promote_version

    return promote_version(settings, test["candidate"], reason, forced=False, expected_champion=test["champion"])

