"""Promotion gate and champion transitions: promote, rollback, record an eval.

The gate and the transitions are pure (data in, data out). The wrappers at the bottom apply them through
`registry.update` and check adapter files against their recorded sha256 first. Nothing here imports torch,
so `cl rollback` stays well under a second.
"""
from __future__ import annotations

import copy
import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import registry
from .errors import NothingToDo, RegistryError
from .records import utc_now
from .settings import Settings

UNUSABLE = ("failed", "tainted")
BASE = "base"  # how users name "no adapter" on the command line
EPSILON = 1e-9


def label(version: str | None) -> str:
    return BASE if version is None else version


# --- the gate --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Decision:
    promote: bool
    reasons: list[str]
    stats: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"promote": self.promote, "reasons": list(self.reasons), "stats": dict(self.stats)}


def mcnemar_exact(candidate: list[bool], champion: list[bool]) -> tuple[int, int, float]:
    """(candidate wins, candidate losses, two-sided exact p) over paired per-prompt outcomes."""
    from scipy.stats import binomtest

    wins = sum(1 for c, o in zip(candidate, champion) if c and not o)
    losses = sum(1 for c, o in zip(candidate, champion) if o and not c)
    if wins + losses == 0:
        return 0, 0, 1.0
    return wins, losses, float(binomtest(losses, wins + losses, 0.5, alternative="two-sided").pvalue)


def paired_outcomes(candidate_result: dict, champion_result: dict) -> tuple[list[bool], list[bool]] | None:
    """Per-prompt pass/fail of both, in the same order; None when they were not run on the same prompts."""
    theirs = {item["prompt"]: item["passed"] for item in champion_result["items"]}
    mine = [item["prompt"] for item in candidate_result["items"]]
    if len(theirs) != len(candidate_result["items"]) or set(mine) != set(theirs):
        return None
    return [item["passed"] for item in candidate_result["items"]], [theirs[p] for p in mine]


def gate(candidate_result: dict, champion_result: dict, alpha: float, general_tolerance: float) -> Decision:
    """Promote only if keyword accuracy does not fall, McNemar shows no significant loss, and the
    general-ability anchor does not drop by more than `general_tolerance`. Tainted candidates never pass."""
    them = label(champion_result.get("version"))
    reasons: list[str] = []
    stats: dict[str, Any] = {"against": them}
    if candidate_result.get("status") in UNUSABLE:
        return Decision(False, [f"candidate is {candidate_result['status']}: it is never promoted"], stats)
    paired = paired_outcomes(candidate_result, champion_result)
    if paired is None:
        return Decision(False, [f"candidate and {them} were evaluated on different prompts: re-run the eval on both"], stats)
    ok = _accuracy_rule(candidate_result, champion_result, them, reasons, stats)
    ok &= _mcnemar_rule(*paired, alpha, reasons, stats)
    ok &= _general_rule(candidate_result, champion_result, them, general_tolerance, reasons, stats)
    return Decision(ok, reasons, stats)


def _accuracy_rule(cand: dict, champ: dict, them: str, reasons: list[str], stats: dict) -> bool:
    stats.update(accuracy=cand["accuracy"], against_accuracy=champ["accuracy"])
    ok = cand["accuracy"] + EPSILON >= champ["accuracy"]
    verb = "is not below" if ok else "is below"
    reasons.append(f"keyword accuracy {cand['accuracy']:.0%} {verb} {them}'s {champ['accuracy']:.0%}")
    return ok


def _mcnemar_rule(cand: list[bool], champ: list[bool], alpha: float, reasons: list[str], stats: dict) -> bool:
    wins, losses, p = mcnemar_exact(cand, champ)
    stats.update(wins=wins, losses=losses, p_value=p, alpha=alpha)
    significant = p < alpha
    ok = not (significant and losses > wins)
    if wins + losses == 0:
        reasons.append("McNemar: both answer every prompt the same way")
    else:
        what = "significant" if significant else "not significant"
        reasons.append(f"McNemar: {wins} prompt(s) gained, {losses} lost, p={p:.3g} ({what} at alpha={alpha:g})")
    return ok


def _general_rule(cand: dict, champ: dict, them: str, tolerance: float, reasons: list[str], stats: dict) -> bool:
    mine, theirs = cand.get("general_accuracy"), champ.get("general_accuracy")
    if mine is None or theirs is None:
        reasons.append("general-ability set not evaluated: no forgetting check")
        return True
    drop = theirs - mine
    stats.update(general_accuracy=mine, against_general_accuracy=theirs, general_drop=drop, general_tolerance=tolerance)
    ok = drop <= tolerance + EPSILON
    verb = "within" if ok else "beyond"
    reasons.append(f"general accuracy {mine:.0%} vs {them}'s {theirs:.0%}: drop {max(drop, 0):.0%} {verb} tolerance {tolerance:.0%}")
    return ok


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
