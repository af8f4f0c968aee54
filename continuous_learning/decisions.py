"""Promotion gate and champion transitions: promote, rollback, record an eval.

The gate and the transitions are pure (data in, data out). The wrappers at the bottom apply them through
`registry.update` and check adapter files against their recorded sha256 first. Nothing here imports torch,
so `cl rollback` stays well under a second.
"""
from __future__ import annotations

import copy
import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import registry
from .core.errors import NothingToDo, RegistryError
from .core.records import utc_now
from .core.settings import Settings

UNUSABLE = ("failed", "tainted")
BASE = "base"  # how users name "no adapter" on the command line
EPSILON = 1e-9


def label(version: str | None) -> str:
    return BASE if version is None else version


# --- the gate --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GateRules:
    """What the gate asks for (from [eval]): evidence of gain on the target questions, non-inferiority on the
    everyday ones."""

    gain_alpha: float = 0.1  # one-sided exact McNemar on the target questions
    general_margin: float = 0.1  # everyday accuracy may be at most this much lower (non-inferiority margin)
    general_alpha: float = 0.05  # one-sided score test of that margin
    min_questions: int = 5  # fewer target questions: judge the gain on the held-out loss instead
    loss_margin: float = 0.05  # held-out loss must fall by at least this share
    rejected_margin: float = 0.0  # nats per token the rejected answers may grow more likely by (0: not at all)


@dataclass(frozen=True)
class Decision:
    promote: bool
    reasons: list[str]
    stats: dict = field(default_factory=dict)
    summary: str = ""

    def to_dict(self) -> dict:
        return {"promote": self.promote, "reasons": list(self.reasons), "stats": dict(self.stats), "summary": self.summary}


def mcnemar_gain(candidate: list[bool], champion: list[bool]) -> tuple[int, int, float]:
    """(wins, losses, one-sided exact p) for "the candidate passes more prompts": the chance of at least `wins`
    successes in wins + losses fair coin flips. 1.0 when nothing differs."""
    from scipy.stats import binomtest

    wins = sum(1 for c, o in zip(candidate, champion) if c and not o)
    losses = sum(1 for c, o in zip(candidate, champion) if o and not c)
    if wins + losses == 0:
        return 0, 0, 1.0
    return wins, losses, float(binomtest(wins, wins + losses, 0.5, alternative="greater").pvalue)


def non_inferiority_p(candidate: list[bool], champion: list[bool], margin: float) -> float:
    """One-sided p-value of H0 "the candidate's accuracy is lower by `margin` or more" on paired outcomes
    (Tango's score test, 1998: the restricted maximum-likelihood variance keeps it valid with no discordant pair).
    Small p: evidence that the candidate is no worse than the champion by `margin`."""
    from scipy.stats import norm

    n = len(candidate)
    if n == 0:
        return 1.0
    lost = sum(1 for c, o in zip(candidate, champion) if o and not c)
    won = sum(1 for c, o in zip(candidate, champion) if c and not o)
    same = n - lost - won
    b = lost * (1 - margin) + won * (1 - 3 * margin) - 2 * same * margin  # the restricted MLE's quadratic
    p_won = (b + math.sqrt(b * b + 8 * n * won * margin * (1 - margin))) / (4 * n)
    variance = (2 * p_won + margin - margin * margin) / n
    if variance <= 0:
        return 0.0 if lost - won < n * margin else 1.0
    z = ((lost - won) / n - margin) / math.sqrt(variance)
    return float(norm.cdf(z))


def paired_outcomes(candidate_result: dict, champion_result: dict, key: str | None = None) -> tuple[list[bool], list[bool]] | None:
    """Per-prompt pass/fail of both (of the target items, or of `key`'s items, e.g. "general"), in the same order;
    None when they were not run on the same prompts."""
    mine_part = candidate_result.get(key) if key else candidate_result
    theirs_part = champion_result.get(key) if key else champion_result
    if not mine_part or not theirs_part:
        return None
    theirs = {item["prompt"]: item["passed"] for item in theirs_part["items"]}
    mine = [item["prompt"] for item in mine_part["items"]]
    if len(theirs) != len(mine_part["items"]) or set(mine) != set(theirs):
        return None
    return [item["passed"] for item in mine_part["items"]], [theirs[p] for p in mine]


def gate(candidate_result: dict, champion_result: dict, rules: GateRules = GateRules()) -> Decision:
    """Promote only on evidence of gain on the target questions (or, with too few of them, a clearly lower
    held-out loss) AND non-inferiority on the everyday questions. Tainted or failed candidates never pass."""
    them = label(champion_result.get("version"))
    me = label(candidate_result.get("version"))
    stats: dict[str, Any] = {"against": them}
    if candidate_result.get("status") in UNUSABLE:
        reason = f"candidate is {candidate_result['status']}: it is never promoted"
        return Decision(False, [reason], stats, f"{me} is not promoted: {reason}.")
    paired = paired_outcomes(candidate_result, champion_result)
    if paired is None:
        reason = f"candidate and {them} were evaluated on different prompts: re-run the eval on both"
        return Decision(False, [reason], stats, f"{me} is not promoted: {reason}.")
    gain_ok, gain_text = _gain_rule(candidate_result, champion_result, paired, rules, stats)
    general_ok, general_text = _general_rule(candidate_result, champion_result, rules, stats)
    rejected_ok, rejected_text = _rejected_rule(candidate_result, champion_result, rules, stats)
    promote = gain_ok and general_ok and rejected_ok
    reasons = [gain_text, general_text] + ([rejected_text] if rejected_text else [])
    verdict = f"{me} is promoted over {them}" if promote else f"{me} is not promoted over {them}"
    summary = f"{verdict}: {'; '.join(reasons)}."
    return Decision(promote, reasons, stats, summary[0].upper() + summary[1:])


def _gain_rule(cand: dict, champ: dict, paired, rules: GateRules, stats: dict) -> tuple[bool, str]:
    wins, losses, p = mcnemar_gain(*paired)
    total = len(paired[0])
    stats.update(accuracy=cand["accuracy"], against_accuracy=champ["accuracy"], wins=wins, losses=losses,
                 gain_p_value=p, gain_alpha=rules.gain_alpha, target_questions=total)
    score = f"it answers {cand['passed']} of {total} target questions against {champ['passed']}"
    if total >= rules.min_questions:
        ok = wins > losses and p <= rules.gain_alpha
        test = f"{wins} gained, {losses} lost, one-sided exact McNemar p = {p:.3g}"
        verdict = "a significant gain" if ok else "no significant gain"
        return ok, f"{score} ({test}: {verdict} at {rules.gain_alpha:g})"
    mine, theirs = cand.get("eval_loss"), champ.get("eval_loss")
    if mine is None or theirs is None:
        return False, f"{score}, too few to show a gain (fewer than {rules.min_questions}) and no held-out loss to judge by"
    stats.update(eval_loss=mine, against_eval_loss=theirs, loss_margin=rules.loss_margin)
    ok = losses == 0 and mine <= theirs * (1 - rules.loss_margin)
    change = f"held-out loss {theirs:.3f} -> {mine:.3f}"
    verdict = "a clear gain" if ok else f"not a gain of at least {rules.loss_margin:.0%} without lost questions"
    return ok, f"{score}, too few for a test, so the held-out loss decides: {change}, {verdict}"


def _rejected_rule(cand: dict, champ: dict, rules: GateRules, stats: dict) -> tuple[bool, str | None]:
    """Answers users rated unhelpful must not have become more likely than under the champion (no text when
    there were none to measure)."""
    mine, theirs = cand.get("rejected_loglik"), champ.get("rejected_loglik")
    if mine is None or theirs is None:
        return True, None
    stats.update(rejected_loglik=mine, against_rejected_loglik=theirs, rejected_margin=rules.rejected_margin)
    ok = mine <= theirs + rules.rejected_margin + EPSILON
    change = f"rejected answers' mean log-likelihood {theirs:.3f} -> {mine:.3f} nats/token"
    return ok, f"{change} ({'no more likely' if ok else 'MORE likely: what users rejected came back'})"


def _general_rule(cand: dict, champ: dict, rules: GateRules, stats: dict) -> tuple[bool, str]:
    paired = paired_outcomes(cand, champ, "general")
    if paired is None:
        return True, "the everyday set was not evaluated on both, so forgetting was not checked"
    mine, theirs = paired
    p = non_inferiority_p(mine, theirs, rules.general_margin)
    kept = sum(mine)
    stats.update(general_accuracy=cand.get("general_accuracy"), against_general_accuracy=champ.get("general_accuracy"),
                 general_p_value=p, general_margin=rules.general_margin, general_alpha=rules.general_alpha,
                 general_lost=sum(1 for c, o in zip(mine, theirs) if o and not c))
    ok = p <= rules.general_alpha
    verdict = "non-inferior" if ok else "not shown non-inferior"
    return ok, (f"on {len(mine)} everyday questions it keeps {kept} against {sum(theirs)} ({verdict} within "
                f"{rules.general_margin:.0%}: score test p = {p:.3g}, alpha {rules.general_alpha:g})")


# --- pure transitions ------------------------------------------------------------------------------------
def adapter(doc: dict, version: str) -> dict:
    entry = doc["adapters"].get(version)
    if entry is None:
        known = ", ".join(sorted(doc["adapters"])) or "none yet"
        raise RegistryError(f"no adapter version '{version}'", f"known versions: {known} (see 'cl adapters')")
    return entry


def _usable(doc: dict, version: str | None) -> None:
    if version is None:
        return
    status = adapter(doc, version)["status"]
    if status in UNUSABLE:
        raise RegistryError(f"adapter {version} is {status} and cannot serve", "choose another version with --to")


def _move_champion(doc: dict, to: str | None, action: str, reason: str, **extra: Any) -> dict:
    old = doc["champion"]
    if old is not None:
        doc["adapters"][old]["status"] = "archived"
    if to is not None:
        doc["adapters"][to]["status"] = "champion"
    doc["champion"] = to
    doc["history"].append({"action": action, "from": old, "to": to, "at": utc_now(), "reason": reason, **extra})
    return doc


def promote(doc: dict, version: str, reason: str, forced: bool = False) -> dict:
    """Make `version` the champion; the old champion is archived."""
    _usable(doc, version)
    if doc["champion"] == version:
        raise NothingToDo(f"adapter {version} is already the champion")
    return _move_champion(doc, version, "promote", reason, forced=forced)


def champion_lineage(doc: dict) -> list[str | None]:
    """The champions before the current one, newest first, following the promotions that led here.

    Ends with None (the base model) once the first promotion is passed."""
    history = doc["history"]
    chain: list[str | None] = []
    current, before = doc["champion"], len(history)
    while current is not None:
        index = next((i for i in range(before - 1, -1, -1) if history[i]["action"] == "promote" and history[i]["to"] == current), None)
        current = None if index is None else history[index]["from"]
        before = 0 if index is None else index
        chain.append(current)
    return chain


def rollback_target(doc: dict, steps: int = 1, to: str | None = None) -> str | None:
    """Where a rollback would move the champion pointer (None = the base model)."""
    if to is not None:
        target = None if to == BASE else to
        if target is not None:
            adapter(doc, target)
        if target == doc["champion"]:
            raise NothingToDo(f"{label(target)} is already serving")
        _usable(doc, target)
        return target
    if doc["champion"] is None:
        raise RegistryError("no champion to roll back: the base model is already serving", "promote one with 'cl promote VERSION'")
    if steps < 1:
        raise RegistryError(f"--steps must be at least 1, got {steps}")
    chain = champion_lineage(doc)
    if steps > len(chain):
        raise RegistryError(
            f"only {len(chain)} step(s) of promotion history to roll back",
            f"use --steps {len(chain)} (ends on {label(chain[-1])}) or --to VERSION",
        )
    target = chain[steps - 1]
    _usable(doc, target)
    return target


def rollback(doc: dict, steps: int = 1, to: str | None = None, reason: str = "") -> dict:
    """Move the champion pointer back `steps` promotions, or to a named version (or 'base')."""
    target = rollback_target(doc, steps, to)
    return _move_champion(doc, target, "rollback", reason or "rollback")


def record_eval(doc: dict, version: str | None, result: dict) -> dict:
    """Append an eval result to the adapter's `evals` (the base model's go to `base_evals`)."""
    if version is None:
        doc.setdefault("base_evals", []).append(result)
    else:
        adapter(doc, version).setdefault("evals", []).append(result)
    return doc


def newest_candidate(doc: dict) -> str | None:
    candidates = [(e.get("created_at", ""), _version_key(v), v) for v, e in doc["adapters"].items() if e["status"] == "candidate"]
    return max(candidates)[2] if candidates else None


def _version_key(version: str) -> tuple:
    try:
        return tuple(int(p) for p in version.split("."))
    except ValueError:
        return (version,)


def sorted_versions(doc: dict) -> list[str]:
    return sorted(doc["adapters"], key=_version_key)


def latest_eval(entry: dict) -> dict | None:
    return entry["evals"][-1] if entry.get("evals") else None


# --- file checks and registry wrappers -------------------------------------------------------------------
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def verify_adapter_files(settings: Settings, entry: dict) -> Path:
    """The adapter's folder, after checking every recorded file against its sha256."""
    version = entry.get("version", "?")
    folder = registry.confined(settings, entry.get("path") or f"adapters/{version}")
    expected = entry.get("sha256") or {}
    if not folder.is_dir():
        raise RegistryError(f"adapter {version}: folder {folder} is missing", "restore it from a backup, or roll back to another version with --to")
    if not expected:
        raise RegistryError(f"adapter {version}: the registry records no sha256 for its files", "re-register it by training again")
    for name, digest in sorted(expected.items()):
        path = registry.confined(settings, folder / name)
        if not path.is_file():
            raise RegistryError(f"adapter {version}: file {name} is missing from {folder}", "restore the folder from a backup, or choose another version")
        if _sha256(path) != digest:
            raise RegistryError(
                f"adapter {version}: {name} does not match its recorded sha256 (changed or corrupted)",
                "restore the folder from a backup, or choose another version",
            )
    return folder


def _unchanged_champion(expected: str | None):
    """Guard for an update planned on an earlier read: refuse if another process moved the champion since."""

    def check(doc: dict) -> dict:
        if doc["champion"] != expected:
            raise RegistryError("the champion changed while this command ran", "run it again")
        return doc

    return check


_ANY = object()


def promote_version(settings: Settings, version: str, reason: str, forced: bool = False, expected_champion: Any = _ANY) -> dict:
    """Promote after verifying the adapter's files. Returns {"from", "to"}.

    `expected_champion`: the champion a gate compared against; if another process has moved it since, refuse."""
    doc = registry.load(settings)
    old = doc["champion"]
    if expected_champion is not _ANY and old != expected_champion:
        raise RegistryError(
            f"the champion changed to {label(old)} while {version} was compared with {label(expected_champion)}",
            "run 'cl eval' again",
        )
    promote(copy.deepcopy(doc), version, reason, forced)  # dry run: refusals come before any file work
    verify_adapter_files(settings, adapter(doc, version))
    guard = _unchanged_champion(old)
    registry.update(
        settings, lambda d: promote(guard(d), version, reason, forced), "promote",
        **{"from": old, "to": version, "reason": reason, "forced": forced},
    )
    return {"from": old, "to": version}


def rollback_champion(settings: Settings, steps: int = 1, to: str | None = None, reason: str = "") -> dict:
    """Roll the champion pointer back; the target's files are checked before the pointer moves.

    Returns {"from", "to", "seconds"}."""
    started = time.perf_counter()
    doc = registry.load(settings)
    old, target = doc["champion"], rollback_target(doc, steps, to)
    if target is not None:
        verify_adapter_files(settings, adapter(doc, target))
    guard = _unchanged_champion(old)
    registry.update(
        settings, lambda d: _move_champion(guard(d), target, "rollback", reason or "rollback"), "rollback",
        **{"from": old, "to": target, "reason": reason or "rollback"},
    )
    return {"from": old, "to": target, "seconds": time.perf_counter() - started}


def record_eval_result(settings: Settings, version: str | None, result: dict) -> None:
    registry.update(
        settings,
        lambda doc: record_eval(doc, version, result),
        "eval",
        version=version,
        accuracy=result.get("accuracy"),
        general_accuracy=result.get("general_accuracy"),
    )
