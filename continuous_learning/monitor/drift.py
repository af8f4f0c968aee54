"""Drift: does recent traffic still look like the data the champion learned from?

Data drift: Population Stability Index (PSI) on categorical features (target tool, language, redacted entity
types) and on numeric ones binned at the reference's quantiles (prompt / answer length, latency), plus a
two-sample Kolmogorov-Smirnov test on the numeric ones. Concept drift: a one-sided test for a drop in the
helpful rate of rated turns. The statistics are pure functions; `check_drift` gathers the two windows from the
raw log (streamed) and the registry, and logs a `drift` event.
"""
from __future__ import annotations

import bisect
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from .. import registry
from ..core.errors import InputError
from ..core.records import Feedback, Interaction, helpful_verdict, parse_time
from ..core.settings import Settings
from ..storage.crypto import cipher_from_env
from ..storage.store import ReadReport, iter_jsonl, joined_interactions

# Empty bins would make PSI infinite (log of zero); a tiny share stands in for "none seen", as is customary.
EPSILON = 1e-4
LEVELS = ("ok", "warn", "alert")
STATUS_ORDER = {"insufficient": -1, "ok": 0, "warn": 1, "alert": 2}
EXIT_CODES = {"ok": 0, "insufficient": 0, "warn": 1, "alert": 2}
CATEGORICAL = ("target_tool", "language", "pii_entities")
NUMERIC = ("prompt_chars", "answer_chars", "latency_ms")
NONE_LABEL = "(none)"
# Below this many expected counts in a cell, the z-test's normal approximation is poor: use Fisher's exact test.
FISHER_BELOW = 5


# --- pure statistics ------------------------------------------------------------------------------------
def psi(expected_counts: Sequence[float], actual_counts: Sequence[float], epsilon: float = EPSILON) -> float:
    """Population Stability Index of two histograms over the same bins: sum (a - e) * ln(a / e) over shares."""
    if len(expected_counts) != len(actual_counts):
        raise ValueError("both histograms need the same bins")
    total_e, total_a = float(sum(expected_counts)), float(sum(actual_counts))
    if total_e <= 0 or total_a <= 0:
        raise ValueError("both histograms need at least one count")
    value = 0.0
    for e, a in zip(expected_counts, actual_counts):
        share_e, share_a = max(e / total_e, epsilon), max(a / total_a, epsilon)
        value += (share_a - share_e) * math.log(share_a / share_e)
    return value


def quantile_bins(reference: Sequence[float], bins: int) -> list[float]:
    """Inner cut points at the reference's quantiles (duplicates merged, so ties never leave empty bins)."""
    if bins < 2 or not reference:
        return []
    ordered = sorted(reference)
    n = len(ordered)
    cuts = []
    for k in range(1, bins):
        position = k * (n - 1) / bins
        low = math.floor(position)
        high = min(low + 1, n - 1)
        cuts.append(ordered[low] + (ordered[high] - ordered[low]) * (position - low))
    return sorted(set(cuts))


def bin_counts(values: Iterable[float], edges: Sequence[float]) -> list[int]:
    """Counts per bin: bin i holds edges[i-1] < v <= edges[i] (the first and last bins are open-ended)."""
    counts = [0] * (len(edges) + 1)
    for v in values:
        counts[bisect.bisect_left(edges, v)] += 1
    return counts


def usable_bins(n_reference: int, n_recent: int, bins: int, psi_warn: float) -> int:
    """At most `bins`, and few enough that two samples of the SAME traffic stay well below the warn level.

    Under no drift PSI is about (bins - 1) * (1/n_reference + 1/n_recent) (a chi-square in disguise), so with
    30 turns a window 10 bins score ~0.6 by chance alone (and the empty bins' epsilon makes it worse). The bin
    count is capped so that this expected value is at most a quarter of `psi_warn`."""
    noise_per_bin = 1 / n_reference + 1 / n_recent
    return max(2, min(bins, int(1 + psi_warn / 4 / noise_per_bin)))


def numeric_psi(reference: Sequence[float], recent: Sequence[float], bins: int) -> float:
    edges = quantile_bins(reference, bins)
    return psi(bin_counts(reference, edges), bin_counts(recent, edges))


def categorical_psi(reference: Iterable[str], recent: Iterable[str]) -> tuple[float, dict]:
    """PSI over the union of categories, and the share of each category in both windows."""
    ref, rec = Counter(reference), Counter(recent)
    categories = sorted(set(ref) | set(rec))
    value = psi([ref[c] for c in categories], [rec[c] for c in categories])
    n_ref, n_rec = sum(ref.values()), sum(rec.values())
    shares = {c: {"reference": round(ref[c] / n_ref, 4), "recent": round(rec[c] / n_rec, 4)} for c in categories}
    return value, shares


def ks(reference: Sequence[float], recent: Sequence[float]) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov statistic and p-value (two-sided)."""
    from scipy.stats import ks_2samp

    result = ks_2samp(reference, recent)
    return float(result.statistic), float(result.pvalue)


def helpful_drop(ref_helpful: int, ref_rated: int, recent_helpful: int, recent_rated: int, alpha: float = 0.05) -> dict:
    """One-sided test that the recent helpful rate is below the reference's.

    Two-proportion z-test with a pooled variance; Fisher's exact test when an expected cell count is small."""
    if ref_rated <= 0 or recent_rated <= 0:
        raise ValueError("both windows need rated turns")
    p_ref, p_recent = ref_helpful / ref_rated, recent_helpful / recent_rated
    pooled = (ref_helpful + recent_helpful) / (ref_rated + recent_rated)
    expected = [pooled * n for n in (ref_rated, recent_rated)] + [(1 - pooled) * n for n in (ref_rated, recent_rated)]
    if min(expected) < FISHER_BELOW:
        from scipy.stats import fisher_exact

        table = [[recent_helpful, recent_rated - recent_helpful], [ref_helpful, ref_rated - ref_helpful]]
        test, z, p_value = "fisher_exact", None, float(fisher_exact(table, alternative="less")[1])
    else:
        from scipy.stats import norm

        se = math.sqrt(pooled * (1 - pooled) * (1 / ref_rated + 1 / recent_rated))
        z = (p_ref - p_recent) / se
        test, p_value = "z_test", float(norm.sf(z))
    return {
        "test": test, "reference_rate": p_ref, "recent_rate": p_recent, "drop": p_ref - p_recent,
        "z": z, "p_value": p_value, "significant": p_value < alpha and p_recent < p_ref,
    }


def psi_level(value: float, warn: float, alert: float) -> str:
    return "alert" if value >= alert else "warn" if value >= warn else "ok"


def worst(levels: Iterable[str]) -> str:
    judged = [lv for lv in levels if lv in LEVELS]
    return max(judged, key=STATUS_ORDER.__getitem__) if judged else "ok"


# --- turning interactions into feature rows --------------------------------------------------------------
@dataclass
class Row:
    """The few fields of one turn that drift needs (kept in memory instead of the turn itself)."""

    created_at: datetime
    target_tool: str
    language: str
    pii_entities: list[str]
    prompt_chars: int
    answer_chars: int
    latency_ms: float | None
    verdict: str = "unrated"


def feature_row(interaction: Interaction, feedback: Feedback, helpful_threshold: int, unhelpful_threshold: int) -> Row:
    return Row(
        created_at=parse_time(interaction.created_at),
        target_tool=interaction.target_tool or NONE_LABEL,
        language=interaction.language or NONE_LABEL,
        pii_entities=list(interaction.pii_entities) or [NONE_LABEL],
        prompt_chars=len(interaction.prompt),
        answer_chars=len(interaction.answer),
        latency_ms=_number(interaction.latency_ms),
        verdict=helpful_verdict(feedback, helpful_threshold, unhelpful_threshold),
    )


def _number(value) -> float | None:
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    return float(value) if numeric and math.isfinite(value) else None


@dataclass
class Window:
    kind: str  # "champion", "range", "before_recent", "recent"
    start: datetime | None = None
    end: datetime | None = None
    ids: set[str] | None = None  # membership by id (the champion's training data) instead of by time
    rows: list[Row] = field(default_factory=list)
    details: dict = field(default_factory=dict)

    def contains(self, interaction_id: str, moment: datetime) -> bool:
        if self.ids is not None:
            return interaction_id in self.ids
        return (self.start is None or moment >= self.start) and (self.end is None or moment < self.end)

    def describe(self) -> dict:
        times = [r.created_at for r in self.rows]
        return {
            "kind": self.kind,
            "start": _iso(self.start if self.start else min(times) if times else None),
            "end": _iso(self.end if self.end else max(times) if times else None),
            "n": len(self.rows),
            "rated": sum(r.verdict != "unrated" for r in self.rows),
            **self.details,
        }


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z") if moment else None


def compare_features(reference: list[Row], recent: list[Row], config) -> list[dict]:
    """One entry per feature: PSI (and KS for numeric ones) with its level."""
    out = []
    for name in CATEGORICAL:
        ref = _categories(reference, name)
        rec = _categories(recent, name)
        value, shares = categorical_psi(ref, rec)
        out.append({"name": name, "kind": "categorical", "psi": value,
                    "level": psi_level(value, config.psi_warn, config.psi_alert),
                    "shares": shares})
    for name in NUMERIC:
        ref = [getattr(r, name) for r in reference if getattr(r, name) is not None]
        rec = [getattr(r, name) for r in recent if getattr(r, name) is not None]
        entry = {"name": name, "kind": "numeric", "n_reference": len(ref), "n_recent": len(rec)}
        if min(len(ref), len(rec)) < config.min_samples:
            out.append({**entry, "psi": None, "ks_stat": None, "ks_p": None, "level": "insufficient"})
            continue
        bins = usable_bins(len(ref), len(rec), config.bins, config.psi_warn)
        value = numeric_psi(ref, rec, bins)
        stat, p_value = ks(ref, rec)
        level = psi_level(value, config.psi_warn, config.psi_alert)
        if level == "ok" and p_value < config.ks_alpha:  # a significant shape change PSI's bins did not catch
            level = "warn"
        out.append({**entry, "psi": value, "bins": bins, "ks_stat": stat, "ks_p": p_value, "level": level,
                    "reference_median": _median(ref), "recent_median": _median(rec)})
    return out


def _categories(rows: list[Row], name: str) -> list[str]:
    if name == "pii_entities":
        return [e for r in rows for e in r.pii_entities]
    return [getattr(r, name) for r in rows]


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return float(ordered[mid]) if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def concept_drift(reference_verdicts: list[str], recent_verdicts: list[str], config) -> dict:
    """Helpful rate of the rated turns of both windows, and whether it dropped significantly."""
    ref_rated = [v for v in reference_verdicts if v != "unrated"]
    rec_rated = [v for v in recent_verdicts if v != "unrated"]
    counts = {
        "reference_rated": len(ref_rated), "reference_helpful": ref_rated.count("helpful"),
        "recent_rated": len(rec_rated), "recent_helpful": rec_rated.count("helpful"),
    }
    if min(len(ref_rated), len(rec_rated)) < config.min_rated:
        return {**counts, "level": "insufficient", "note": f"fewer than {config.min_rated} rated turns in a window"}
    result = helpful_drop(counts["reference_helpful"], len(ref_rated), counts["recent_helpful"], len(rec_rated),
                          config.helpful_alpha)
    return {**counts, **result, "level": "alert" if result["significant"] else "ok"}


def verdict(reference: Window, recent: Window, features: list[dict], concept: dict, min_samples: int) -> str:
    if min(len(reference.rows), len(recent.rows)) < min_samples:
        return "insufficient"
    return worst([f["level"] for f in features] + [concept["level"]])


# --- windows --------------------------------------------------------------------------------------------
def parse_range(text: str) -> tuple[datetime, datetime]:
    """'YYYY-MM-DD..YYYY-MM-DD' (both days included) to [start, end)."""
    try:
        first, last = text.split("..")
        start = datetime.strptime(first.strip(), "%Y-%m-%d").replace(tzinfo=UTC)
        end = datetime.strptime(last.strip(), "%Y-%m-%d").replace(tzinfo=UTC) + timedelta(days=1)
    except ValueError:
        raise InputError(f"reference '{text}' is neither 'champion' nor a range YYYY-MM-DD..YYYY-MM-DD",
                         "e.g. --reference 2026-10-01..2026-10-31") from None
    if end <= start:
        raise InputError(f"reference range '{text}' ends before it starts", "put the earlier day first")
    return start, end


def champion_snapshot_ids(doc: dict) -> tuple[str | None, list[str]]:
    """The champion and the snapshots it learned from: its own and, through warm starts, its parents'."""
    champion = doc.get("champion")
    snapshots: list[str] = []
    seen: set[str] = set()
    version = champion
    while version and (entry := registry.adapter_view(doc, version)) is not None and version not in seen:
        seen.add(version)
        snap = entry.snapshot_id
        if snap and snap not in snapshots:
            snapshots.append(snap)
        version = entry.warm_start_from
    return champion, snapshots


def training_interaction_ids(settings: Settings, doc: dict, snapshot_ids: list[str]) -> tuple[set[str], list[str]]:
    """Ids of the interactions behind the snapshots' train and eval examples, and snapshots whose files are gone."""
    ids: set[str] = set()
    missing: list[str] = []
    for snap in doc["snapshots"]:
        if snap["id"] not in snapshot_ids:
            continue
        for key in ("file", "eval_file"):
            if not snap.get(key):
                continue
            path = registry.confined(settings, snap[key])
            if not path.exists():
                missing.append(snap["id"])
                continue
            for _, record in iter_jsonl(path):
                if isinstance(record, dict):
                    ids.update(str(s) for s in record.get("source_ids") or [])
    return ids, sorted(set(missing) | (set(snapshot_ids) - {s["id"] for s in doc["snapshots"]}))


def reference_window(settings: Settings, spec: str, recent_start: datetime) -> Window:
    if spec != "champion":
        start, end = parse_range(spec)
        return Window("range", start=start, end=end, details={"spec": spec})
    doc = registry.load(settings)
    champion, snapshot_ids = champion_snapshot_ids(doc)
    if champion is None:
        return Window("before_recent", end=recent_start, details={"note": "no champion: the interactions before the "
                                                                          "recent window"})
    ids, missing = training_interaction_ids(settings, doc, snapshot_ids)
    details = {"champion": champion, "snapshots": snapshot_ids}
    if missing:
        details["missing_snapshots"] = missing
    if not ids:
        details["note"] = (f"champion {champion}'s training data could not be traced: "
                           "the interactions before the recent window")
        return Window("before_recent", end=recent_start, details=details)
    return Window("champion", ids=ids, details=details)


def fill_windows(settings: Settings, reference: Window, recent: Window,
                 report: ReadReport | None = None) -> list[tuple[datetime, str]]:
    """One streaming pass over the raw log; only the rows of the two windows are kept, plus (time, verdict) of
    every rated turn outside the recent window (the concept-drift baseline of the champion reference).
    Wrongly shaped lines are skipped and counted in `report` (the shared reader)."""
    curate = settings.curate
    rated: list[tuple[datetime, str]] = []
    for interaction in joined_interactions(settings.raw_log, report, cipher_from_env(), open_texts=True):
        moment = parse_time(interaction.created_at)
        feedback = interaction.feedback
        in_ref, in_recent = reference.contains(interaction.id, moment), recent.contains(interaction.id, moment)
        if not (in_ref or in_recent):
            judged = helpful_verdict(feedback, curate.helpful_threshold, curate.unhelpful_threshold)
            if judged != "unrated" and moment < recent.start:
                rated.append((moment, judged))
            continue
        row = feature_row(interaction, feedback, curate.helpful_threshold, curate.unhelpful_threshold)
        if in_ref:
            reference.rows.append(row)
        elif moment < recent.start and row.verdict != "unrated":
            rated.append((moment, row.verdict))
        if in_recent:
            recent.rows.append(row)
    return rated


def concept_baseline(reference: Window, rated_elsewhere: list[tuple[datetime, str]],
                     recent_start: datetime) -> tuple[list[str], dict]:
    """Verdicts the recent helpful rate is compared with.

    A time window is its own baseline. The champion's training data cannot be: curation keeps mostly helpful
    turns, so its helpful rate is biased upwards. Its baseline is every rated turn in the span of time that data
    was drawn from (before the recent window)."""
    if reference.kind != "champion" or not reference.rows:
        return [r.verdict for r in reference.rows], {"basis": "reference window"}
    first = min(r.created_at for r in reference.rows)
    last = min(max(r.created_at for r in reference.rows), recent_start)
    inside = [r.verdict for r in reference.rows if first <= r.created_at < recent_start]
    inside += [v for moment, v in rated_elsewhere if first <= moment <= last]
    return inside, {"basis": "all rated turns in the span of the champion's training data", "start": _iso(first),
                    "end": _iso(last)}


# --- the check --------------------------------------------------------------------------------------------
def check_drift(settings: Settings, reference: str | None = None, recent_days: int | None = None, log: bool = True,
                now: datetime | None = None) -> dict:
    """Compare the recent window with the reference; JSON-able result, logged as a `drift` event when `log`."""
    config = settings.drift
    spec = (reference or config.reference).strip()
    days = config.recent_days if recent_days is None else recent_days
    if days < 1:
        raise InputError(f"recent window must be at least 1 day, got {days}", "pass --recent-days 7 for example")
    now = now or datetime.now(UTC)
    recent = Window("recent", start=now - timedelta(days=days), end=now + timedelta(seconds=1), details={"days": days})
    ref = reference_window(settings, spec, recent.start)
    report = ReadReport()
    rated_elsewhere = fill_windows(settings, ref, recent, report)
    baseline, basis = concept_baseline(ref, rated_elsewhere, recent.start)
    result = build_result(ref, recent, config, now, baseline, basis)
    result["skipped_lines"] = report.skipped
    if report.skipped:
        result["notes"].append(f"raw log: {report.skipped} unreadable or wrongly shaped line(s) skipped")
    if log:
        registry.log_event(settings, "drift", status=result["status"], reference=result["reference"]["kind"],
                           n_reference=result["reference"]["n"], n_recent=result["recent"]["n"],
                           psi={f["name"]: _round(f["psi"]) for f in result["features"]},
                           worst_feature=result["worst_feature"], helpful_drop=_round(result["concept"].get("drop")),
                           concept=result["concept"]["level"])
    return result


def build_result(reference: Window, recent: Window, config, now: datetime, baseline: list[str] | None = None,
                 basis: dict | None = None) -> dict:
    enough = min(len(reference.rows), len(recent.rows)) >= config.min_samples
    features = compare_features(reference.rows, recent.rows, config) if enough else []
    baseline = [r.verdict for r in reference.rows] if baseline is None else baseline
    concept = concept_drift(baseline, [r.verdict for r in recent.rows], config) if enough else {"level": "insufficient"}
    concept["baseline"] = basis or {"basis": "reference window"}
    status = verdict(reference, recent, features, concept, config.min_samples)
    judged = [f for f in features if f.get("psi") is not None]
    top = max(judged, key=lambda f: f["psi"])["name"] if judged else None
    notes = []
    if not enough:
        notes.append(f"too few interactions for a verdict: reference {len(reference.rows)}, recent {len(recent.rows)} "
                     f"(need {config.min_samples} each; drift.min_samples)")
    return {
        "status": status,
        "checked_at": _iso(now),
        "reference": reference.describe(),
        "recent": recent.describe(),
        "thresholds": {"psi_warn": config.psi_warn, "psi_alert": config.psi_alert, "ks_alpha": config.ks_alpha,
                       "helpful_alpha": config.helpful_alpha, "min_samples": config.min_samples, "bins": config.bins},
        "features": features,
        "concept": concept,
        "worst_feature": top,
        "notes": notes,
        "exit_code": EXIT_CODES[status],
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 4)
