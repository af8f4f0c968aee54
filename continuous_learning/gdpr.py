"""Privacy rights over stored data: forget one user, expire old interactions, export one user's data.

User ids are never stored: a request names the raw id, which is hashed with the workspace salt and matched
against `user_hash` (raw log) and `user_hashes` (snapshots, adapters).

Rewrites stream through a temp file in the same folder (fsync, rename), so a process killed mid-way leaves
every original intact, and the next run removes the temp leftovers. `forget` updates the registry last and
uses the registry's snapshot `user_hashes` as its to-do list: a rerun after a crash finishes the job.
Lock order: `train` (forget only), `curate` workspace locks, then the registry lock, then the raw log's append lock.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import orjson

from . import registry
from .crypto import cipher_from_env, open_messages
from .decisions import UNUSABLE, champion_lineage
from .errors import CLError, InputError
from .ingest import rebuild_feedback_counters
from .privacy import hash_user_id, load_salt
from .records import FEEDBACK, INTERACTION, Feedback, parse_time, utc_now
from .settings import Settings
from .store import FILE_MODE, _lock_for, fsync_dir, atomic_write_json, iter_jsonl, read_json, remove_stale_temp_files, workspace_lock

SPLITS = (("train", "file", "sha256"), ("eval", "eval_file", "eval_sha256"))
LOCK_WAIT_S = 10.0


def user_hash_of(settings: Settings, user_id: str) -> str:
    if not user_id or not user_id.strip():
        raise InputError("empty user id", "pass the id the user chatted with, e.g. --user alice")
    salt, _ = load_salt(settings.salt_file)
    return hash_user_id(user_id, salt)


def subject_tag(user_hash: str) -> str:
    """A second-level hash for the event log: repeat requests correlate, the stored hash is not repeated."""
    return hashlib.sha256(f"forget:{user_hash}".encode()).hexdigest()[:16]


# --- streaming rewrite --------------------------------------------------------------------------------
@dataclass
class Filtered:
    """What a streaming filter kept and dropped, and the digest of the file as it now is."""

    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    sha256: str = hashlib.sha256(b"").hexdigest()
    users: set[str] = field(default_factory=set)

    @property
    def total_dropped(self) -> int:
        return sum(self.dropped.values())


def _parse(raw: bytes) -> dict | None:
    try:
        record = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def filter_jsonl(path: Path, keep: Callable[[dict], bool]) -> Filtered:
    """Rewrite `path` without the records `keep` refuses; replaced only when something was dropped.

    Lines that are not JSON objects (a torn tail, garbage) are kept byte for byte: we cannot tell whose they are."""
    result = Filtered()
    if not path.exists():
        return result
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as out, open(path, "rb") as source:
            for raw in source:
                record = _parse(raw)
                if record is not None and not keep(record):
                    result.dropped[str(record.get("type") or "example")] += 1
                    continue
                out.write(raw)
                digest.update(raw)
                result.kept += 1
                if record is not None:
                    result.users.update(str(h) for h in record.get("user_hashes") or [])
            out.flush()
            os.fsync(out.fileno())
        if result.dropped:
            os.replace(tmp, path)
            fsync_dir(path.parent)
    except OSError as exc:
        raise CLError(f"cannot rewrite {path}: {exc.strerror or exc}", "free space or fix permissions and run the command again; "
                      "the original file is unchanged") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    result.sha256 = digest.hexdigest()
    return result


def _records(path: Path) -> Iterator[dict]:
    for _, record in iter_jsonl(path):
        if isinstance(record, dict):
            yield record


# --- raw log --------------------------------------------------------------------------------------------
def interaction_ids(path: Path, wanted: Callable[[dict], bool]) -> set[str]:
    return {str(r.get("id")) for r in _records(path) if r.get("type") == INTERACTION and wanted(r)}


def drop_from_raw_log(settings: Settings, doomed: Callable[[dict], bool]) -> Counter:
    """Drop the interactions `doomed` picks, and every feedback event pointing at them, from the raw log.

    Holds the raw log's append lock, so no chat turn lands between the read and the rename."""
    path = settings.raw_log
    if not path.exists():
        return Counter()
    with _lock_for(path):
        remove_stale_temp_files(path.parent)
        gone = interaction_ids(path, doomed)

        def keep(record: dict) -> bool:
            if record.get("type") == FEEDBACK and str(record.get("interaction_id")) in gone:
                return False
            return not doomed(record)

        return filter_jsonl(path, keep).dropped


# --- snapshots and registry -----------------------------------------------------------------------------
def snapshot_files(settings: Settings, snap: dict) -> dict[str, Path | None]:
    """The snapshot's train/eval/manifest paths, each confined to the workspace (None when not named)."""
    keys = {"train": "file", "eval": "eval_file", "manifest": "manifest"}
    return {name: registry.confined(settings, snap[key]) if snap.get(key) else None for name, key in keys.items()}


def all_snapshot_files(settings: Settings, doc: dict) -> dict[str, dict[str, Path | None]]:
    """Resolved up front, so a bad path stops the command before anything is changed."""
    return {snap["id"]: snapshot_files(settings, snap) for snap in doc["snapshots"]}


def _mentions(record: dict, user_hash: str) -> bool:
    return user_hash in (record.get("user_hashes") or [])


def scrub_snapshot(snap: dict, files: dict[str, Path | None], user_hash: str) -> dict | None:
    """Rewrite one snapshot's files without the user's examples. Returns the registry fields to update, or None
    when the snapshot never held the user (neither its files nor its registry entry)."""
    results = {name: filter_jsonl(files[name], lambda r: not _mentions(r, user_hash)) for name, _, _ in SPLITS
               if files[name] is not None and files[name].exists()}
    if not any(r.total_dropped for r in results.values()) and user_hash not in (snap.get("user_hashes") or []):
        return None
    users = set().union(*(r.users for r in results.values())) if results else set(snap.get("user_hashes") or []) - {user_hash}
    changes: dict[str, Any] = {"user_hashes": sorted(users)}
    counts = dict(snap.get("counts") or {})
    removed = sum(r.total_dropped for r in results.values())
    counts["forgotten"] = int(counts.get("forgotten", 0)) + removed
    for name, _, sha_key in SPLITS:
        if name in results:
            changes[sha_key] = results[name].sha256
            changes[f"{name}_examples"] = results[name].kept
            counts[name] = results[name].kept
    changes["counts"] = counts
    changes["_removed"] = removed
    return changes


def update_manifest(path: Path | None, changes: dict) -> None:
    manifest = read_json(path) if path is not None else None
    if not isinstance(manifest, dict):
        return
    sha = dict(manifest.get("sha256") or {})
    sha.update({name: changes[key] for name, _, key in SPLITS if key in changes})
    manifest.update(sha256=sha, user_hashes=changes["user_hashes"], counts=changes["counts"])
    atomic_write_json(path, manifest)


def taint_adapters(doc: dict, user_hash: str, snapshot_ids: set[str]) -> list[str]:
    """Mark every adapter trained on the user's data `tainted` (pure on `doc`); returns the newly tainted."""
    tainted = []
    for version, entry in doc["adapters"].items():
        trained_on = user_hash in (entry.get("user_hashes") or []) or (entry.get("snapshot") or {}).get("id") in snapshot_ids
        if trained_on and entry.get("status") != "tainted":
            entry.update(status="tainted", tainted_at=utc_now(), tainted_reason="trained on data of a forgotten user")
            tainted.append(version)
    return tainted


def retire_tainted_champion(doc: dict) -> dict | None:
    """If the champion is tainted, serve the nearest untainted ancestor in the promotion history instead
    (or the base model). Pure on `doc`; returns the move, or None when the champion is fine.

    The ancestor's files are not re-verified here: `cl rollback --to` does that when choosing by hand."""
    old = doc.get("champion")
    if old is None or doc["adapters"][old].get("status") != "tainted":
        return None
    lineage = champion_lineage(doc)
    target = next((v for v in lineage if v is None or doc["adapters"].get(v, {}).get("status") not in UNUSABLE), None)
    if target is not None:
        doc["adapters"][target]["status"] = "champion"
    doc["champion"] = target
    move = {"action": "forget", "from": old, "to": target, "at": utc_now(), "reason": "champion trained on data of a forgotten user"}
    doc["history"].append(move)
    return move


# --- forget -----------------------------------------------------------------------------------------------
@dataclass
class ForgetReport:
    interactions: int = 0
    feedback_events: int = 0
    snapshot_examples: int = 0
    snapshots: list[str] = field(default_factory=list)
    adapters_tainted: list[str] = field(default_factory=list)
    champion_move: dict | None = None

    @property
    def found_nothing(self) -> bool:
        return not (self.interactions or self.feedback_events or self.snapshots or self.adapters_tainted)

    def to_dict(self) -> dict:
        return {"interactions": self.interactions, "feedback_events": self.feedback_events,
                "snapshot_examples": self.snapshot_examples, "snapshots": list(self.snapshots),
                "adapters_tainted": list(self.adapters_tainted),
                "champion": None if self.champion_move is None else {k: self.champion_move[k] for k in ("from", "to")}}


def forget_user(settings: Settings, user_id: str) -> ForgetReport:
    """Remove one user from the raw log and every snapshot, taint the adapters trained on them, log it."""
    user_hash = user_hash_of(settings, user_id)
    report = ForgetReport()
    # the train lock too: a run in progress would register an adapter from the user's examples, untainted
    with workspace_lock(settings.lock_dir, "train", wait=LOCK_WAIT_S), \
            workspace_lock(settings.lock_dir, "curate", wait=LOCK_WAIT_S), registry.locked(settings):
        doc = registry.load(settings)
        files = all_snapshot_files(settings, doc)
        remove_stale_temp_files(settings.curated_dir)
        dropped = drop_from_raw_log(settings, _by_user(user_hash))
        report.interactions, report.feedback_events = dropped[INTERACTION], dropped[FEEDBACK]
        after = _scrub_snapshots(copy.deepcopy(doc), files, user_hash, report)
        report.adapters_tainted = taint_adapters(after, user_hash, set(report.snapshots))
        report.champion_move = retire_tainted_champion(after)
        if after != doc:
            atomic_write_json(settings.registry_file, registry.validate(after))
    if report.interactions or report.feedback_events:
        rebuild_feedback_counters(settings)
    if not report.found_nothing:
        registry.log_event(settings, "forget", subject=subject_tag(user_hash), **report.to_dict())
    return report


def _by_user(user_hash: str) -> Callable[[dict], bool]:
    return lambda record: record.get("user_hash") == user_hash


def _scrub_snapshots(doc: dict, files: dict[str, dict[str, Path | None]], user_hash: str, report: ForgetReport) -> dict:
    for snap in doc["snapshots"]:
        changes = scrub_snapshot(snap, files[snap["id"]], user_hash)
        if changes is None:
            continue
        report.snapshot_examples += changes.pop("_removed")
        report.snapshots.append(snap["id"])
        update_manifest(files[snap["id"]]["manifest"], changes)
        snap.update(changes)
    return doc


# --- retention --------------------------------------------------------------------------------------------
def _older_than(cutoff: datetime) -> Callable[[dict], bool]:
    def old(record: dict) -> bool:
        try:
            return parse_time(str(record["created_at"])) < cutoff
        except (KeyError, ValueError):
            return False  # no readable time: keep rather than guess

    return old


def drop_expired(settings: Settings, days: int, now: datetime | None = None) -> Counter:
    """Drop raw interactions (and their feedback) older than `days`. The caller holds the `curate` lock."""
    if days <= 0:
        raise InputError(f"--days must be at least 1 (got {days})", "0 keeps everything: simply don't run retention")
    cutoff = (now or datetime.now(timezone.utc)) - timedelta(days=days)
    old = _older_than(cutoff)
    dropped = drop_from_raw_log(settings, lambda r: old(r) and r.get("type") in (INTERACTION, FEEDBACK))
    if dropped:
        rebuild_feedback_counters(settings)
        registry.log_event(settings, "retention", days=days, cutoff=cutoff.isoformat(),
                           interactions=dropped[INTERACTION], feedback_events=dropped[FEEDBACK])
    return dropped


def apply_retention(settings: Settings, days: int, now: datetime | None = None) -> Counter:
    """`cl retention`: drop_expired under the `curate` lock (curate itself calls drop_expired, holding it)."""
    with workspace_lock(settings.lock_dir, "curate", wait=LOCK_WAIT_S):
        return drop_expired(settings, days, now)


# --- export (right of access) -----------------------------------------------------------------------------
def export_user(settings: Settings, user_id: str) -> Iterator[dict]:
    """Everything stored about one user, one `{"category", "record"}` dict per item."""
    user_hash = user_hash_of(settings, user_id)
    doc = registry.load(settings)
    files = all_snapshot_files(settings, doc)
    cipher = cipher_from_env()
    yield from _export_raw(settings.raw_log, user_hash, cipher)
    snapshot_ids = set()
    for snap in doc["snapshots"]:
        for name, _, _ in SPLITS:
            path = files[snap["id"]][name]
            for record in _records(path) if path is not None else ():
                if _mentions(record, user_hash):
                    snapshot_ids.add(snap["id"])
                    yield {"category": "snapshot_example", "snapshot": snap["id"], "split": name,
                           "record": open_messages(record, cipher)}
    for version, entry in doc["adapters"].items():
        if user_hash in (entry.get("user_hashes") or []) or (entry.get("snapshot") or {}).get("id") in snapshot_ids:
            yield {"category": "adapter", "record": _adapter_summary(version, entry)}


def _export_raw(path: Path, user_hash: str, cipher=None) -> Iterator[dict]:
    theirs = interaction_ids(path, _by_user(user_hash))
    joined: dict[str, Feedback] = {}
    for record in _records(path):
        if record.get("type") == FEEDBACK and str(record.get("interaction_id")) in theirs:
            key = str(record["interaction_id"])
            feedback = open_messages(record, cipher).get("feedback")
            joined[key] = joined.get(key, Feedback()).merged(Feedback.from_dict(feedback))
    for record in _records(path):
        record = open_messages(record, cipher) if record.get("type") in (INTERACTION, FEEDBACK) else record
        kind = record.get("type")
        if kind == INTERACTION and str(record.get("id")) in theirs:
            merged = Feedback.from_dict(record.get("feedback")).merged(joined.get(str(record["id"]), Feedback()))
            yield {"category": "interaction", "record": {**record, "joined_feedback": merged.to_dict()}}
        elif kind == FEEDBACK and record.get("user_hash") == user_hash:
            yield {"category": "feedback", "record": record}


def _adapter_summary(version: str, entry: dict) -> dict:
    keys = ("status", "created_at", "snapshot", "base_model", "tainted_at", "tainted_reason")
    return {"version": version, **{k: entry[k] for k in keys if k in entry}}
