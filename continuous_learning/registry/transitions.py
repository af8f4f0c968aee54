"""Champion transitions on the registry document: promote, roll back, record an eval, taint what a forgotten user's
data trained and retire a tainted champion, and the read helpers (version order, latest eval, who may serve).
Pure: a document in, the same document changed out; no files."""
from __future__ import annotations

from typing import Any

from ..core.errors import NothingToDo, RegistryError
from ..core.records import utc_now
from .views import UNUSABLE_STATUSES, Adapter, adapter_status, version_key

UNUSABLE = UNUSABLE_STATUSES
BASE = "base"  # how users name "no adapter" on the command line


def label(version: str | None) -> str:
    return BASE if version is None else version

def adapter(doc: dict, version: str) -> dict:
    entry = doc["adapters"].get(version)
    if entry is None:
        known = ", ".join(sorted(doc["adapters"])) or "none yet"
        raise RegistryError(f"no adapter version '{version}'", f"known versions: {known} (see 'cl adapters')")
    return entry


def registered_adapter(doc: dict, version: str) -> Adapter:
    """The view of a registered version; RegistryError naming the known ones when it is not registered."""
    return Adapter.from_entry(version, adapter(doc, version))


def _usable(doc: dict, version: str | None) -> None:
    if version is None:
        return
    status = adapter(doc, version)["status"]
    if status in UNUSABLE:
        raise RegistryError(f"adapter {version} is {status} and cannot serve", "choose another version with --to")


def move_champion(doc: dict, to: str | None, action: str, reason: str, **extra: Any) -> dict:
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
    return move_champion(doc, version, "promote", reason, forced=forced)


def champion_lineage(doc: dict) -> list[str | None]:
    """The champions before the current one, newest first, following the promotions that led here.

    Ends with None (the base model) once the first promotion is passed."""
    history = doc["history"]
    chain: list[str | None] = []
    current, before = doc["champion"], len(history)
    while current is not None:
        index = next((i for i in range(before - 1, -1, -1)
                      if history[i]["action"] == "promote" and history[i]["to"] == current), None)
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
        raise RegistryError("no champion to roll back: the base model is already serving",
                            "promote one with 'cl promote VERSION'")
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
    return move_champion(doc, target, "rollback", reason or "rollback")


def record_eval(doc: dict, version: str | None, result: dict) -> dict:
    """Append an eval result to the adapter's `evals` (the base model's go to `base_evals`)."""
    if version is None:
        doc.setdefault("base_evals", []).append(result)
    else:
        adapter(doc, version).setdefault("evals", []).append(result)
    return doc


def newest_candidate(doc: dict) -> str | None:
    candidates = [(e.get("created_at", ""), version_key(v), v)
                  for v, e in doc["adapters"].items() if e["status"] == "candidate"]
    return max(candidates)[2] if candidates else None


def sorted_versions(doc: dict) -> list[str]:
    return sorted(doc["adapters"], key=version_key)


def latest_eval(entry: dict) -> dict | None:
    return entry["evals"][-1] if entry.get("evals") else None



def taint_adapters(doc: dict, user_hash: str, snapshot_ids: set[str]) -> list[str]:
    """Mark every adapter trained on the user's data `tainted` and drop the user's hash from every adapter entry
    (pure on `doc`); returns the newly tainted."""
    tainted = []
    for version, entry in doc["adapters"].items():
        hashes = entry.get("user_hashes") or []
        trained_on = user_hash in hashes or (entry.get("snapshot") or {}).get("id") in snapshot_ids
        if user_hash in hashes:
            entry["user_hashes"] = [h for h in hashes if h != user_hash]
        if trained_on and entry.get("status") != "tainted":
            entry.update(status="tainted", tainted_at=utc_now(), tainted_reason="trained on data of a forgotten user")
            tainted.append(version)
    return tainted


def retire_tainted_champion(doc: dict) -> dict | None:
    """If the champion is tainted, serve the nearest untainted ancestor in the promotion history instead
    (or the base model). Pure on `doc`; returns the move, or None when the champion is fine.

    The ancestor's files are not re-verified here: `cl rollback --to` does that when choosing by hand."""
    old = doc.get("champion")
    if old is None or adapter(doc, old).get("status") != "tainted":
        return None
    lineage = champion_lineage(doc)
    target = next((v for v in lineage if v is None or adapter_status(doc, v) not in UNUSABLE), None)
    if target is not None:
        adapter(doc, target)["status"] = "champion"
    doc["champion"] = target
    move = {"action": "forget", "from": old, "to": target, "at": utc_now(),
            "reason": "champion trained on data of a forgotten user"}
    doc["history"].append(move)
    return move
