"""Privacy rights over stored data: forget one user, expire old interactions, export one user's data.

User ids are never stored: a request names the raw id, which is hashed with the workspace salt (checked against
the workspace's fingerprint, so another salt is an error, not "nothing stored") and matched against `user_hash`
(raw log) and `user_hashes` (snapshots, adapters).

`forget` first PREPARES everything (streaming rewrites into temp files beside the originals, the recounted
counters and knowledge, with every decryption done), and only then COMMITS: generation metrics, snapshots,
counters and knowledge, the raw log, and the registry last. A process killed before the registry write leaves
the registry's `user_hashes` as the to-do list, so running forget again finishes the job; what comes after the
registry (deleting tainted adapters' weights, scrubbing their lineage, stopping an A/B test) is redone by every
forget until done. Lock order: `train`, `curate`, the registry lock, the raw log's append lock, the generation
metrics' append lock.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from .. import registry
from ..core.errors import InputError
from ..core.records import FEEDBACK, INTERACTION, Feedback, FeedbackEvent, Interaction, parse_time
from ..core.settings import Settings
from ..registry import retire_tainted_champion, taint_adapters
from ..storage.crypto import cipher_from_env, open_messages
from ..storage.keys import hash_user_id, load_salt
from ..storage.store import (
    ReadReport,
    atomic_write_json,
    file_lock,
    iter_jsonl,
    read_json,
    read_log,
    remove_stale_temp_files,
    workspace_lock,
)
from .rewrite import Recount, Rewrite, prepare_rewrite, prepared

SPLITS = (("train", "file", "sha256"), ("eval", "eval_file", "eval_sha256"))
LOCK_WAIT_S = 10.0
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".npz")
CURSOR_ID_LISTS = ("recorded_ids", "feedback_ids", "deferred_ids")


def user_hash_of(settings: Settings, user_id: str) -> str:
    if not user_id or not user_id.strip():
        raise InputError("empty user id", "pass the id the user chatted with, e.g. --user alice")
    salt, _ = load_salt(settings.salt_file, record=False)  # another salt than the data's is refused here
    return hash_user_id(user_id, salt)


def subject_tag(user_hash: str) -> str:
    """A second-level hash for the event log: repeat requests correlate, the stored hash is not repeated."""
    return hashlib.sha256(f"forget:{user_hash}".encode()).hexdigest()[:16]


# --- the raw log ----------------------------------------------------------------------------------------
def doomed_interaction_ids(path: Path, doomed: Callable[[dict], bool]) -> set[str]:
    return {str(r.get("id")) for _, r in iter_jsonl(path) if isinstance(r, dict) and r.get("type") == INTERACTION
            and doomed(r)}


def raw_log_keep(path: Path, doomed: Callable[[dict], bool]) -> Callable[[dict], bool]:
    """Keep what `doomed` spares, minus every feedback event that points at a doomed interaction."""
    gone = doomed_interaction_ids(path, doomed)

    def keep(record: dict) -> bool:
        if record.get("type") == FEEDBACK and str(record.get("interaction_id")) in gone:
            return False
        return not doomed(record)

    return keep


def prepare_raw_log(settings: Settings, doomed: Callable[[dict], bool], recount: Recount) -> Rewrite:
    """The raw log without the doomed records (and damaged lines), recounting what stays. Caller holds its lock."""
    remove_stale_temp_files(settings.raw_log.parent)
    return prepare_rewrite(settings.raw_log, raw_log_keep(settings.raw_log, doomed), seen=recount.add)


def prepare_generation_metrics(settings: Settings, present: dict) -> Rewrite:
    """Generation metrics rows only for interactions still in the raw log. Caller holds its lock."""
    def keep(row: dict) -> bool:
        target = row.get("interaction_id")
        return target is None or str(target) in present

    return prepare_rewrite(settings.generation_metrics, keep)


def _lock_if_exists(path: Path):
    """The append lock of a file that exists (a missing one has nothing to rewrite: no lock file is created)."""
    return file_lock(path) if path.exists() else contextlib.nullcontext()


# --- snapshots and registry -----------------------------------------------------------------------------
def snapshot_files(settings: Settings, snap: dict) -> dict[str, Path | None]:
    """The snapshot's train/eval/manifest paths, each confined to the workspace (None when not named)."""
    keys = {"train": "file", "eval": "eval_file", "manifest": "manifest"}
    return {name: registry.confined(settings, snap[key]) if snap.get(key) else None for name, key in keys.items()}


def all_snapshot_files(settings: Settings, doc: dict) -> dict[str, dict[str, Path | None]]:
    """Resolved up front, so a bad path stops the command before anything is changed."""
    return {snap["id"]: snapshot_files(settings, snap) for snap in doc["snapshots"]}


def _mentions(record: dict, user_hash: str) -> bool:
    hashes = record.get("user_hashes")
    return isinstance(hashes, list) and user_hash in hashes


def prepare_snapshot(files: dict[str, Path | None], user_hash: str) -> dict[str, Rewrite]:
    return {name: prepare_rewrite(files[name], lambda r: not _mentions(r, user_hash)) for name, _, _ in SPLITS
            if files[name] is not None and files[name].exists()}


def snapshot_changes(snap: dict, rewrites: dict[str, Rewrite], user_hash: str) -> dict | None:
    """The registry fields to update after rewriting one snapshot, or None when it never held the user."""
    removed = sum(r.total_dropped for r in rewrites.values())
    if not removed and user_hash not in (snap.get("user_hashes") or []):
        return None
    users = set().union(*(r.users for r in rewrites.values())) if rewrites else set(snap.get("user_hashes") or [])
    changes: dict[str, Any] = {"user_hashes": sorted(users - {user_hash})}
    counts = dict(snap.get("counts") or {})
    counts["forgotten"] = int(counts.get("forgotten", 0) or 0) + removed
    for name, _, sha_key in SPLITS:
        if name in rewrites:
            changes[sha_key] = rewrites[name].sha256
            changes[f"{name}_examples"] = rewrites[name].kept
            counts[name] = rewrites[name].kept
    changes["counts"] = counts
    changes["_removed"] = removed
    return changes


def scrub_cursor(cursor: Any, absent: set[str]) -> Any:
    """A snapshot cursor without ids that are no longer in the raw log (pure)."""
    if not isinstance(cursor, dict):
        return cursor
    out = dict(cursor)
    for key in CURSOR_ID_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [i for i in out[key] if i not in absent]
    if out.get("last_interaction_id") in absent:
        out["last_interaction_id"] = None
    return out


def cursor_ids(doc: dict) -> set[str]:
    ids: set[str] = set()
    for snap in doc["snapshots"]:
        cursor = snap.get("cursor") or {}
        for key in CURSOR_ID_LISTS:
            ids.update(i for i in cursor.get(key) or [] if isinstance(i, str))
        if isinstance(cursor.get("last_interaction_id"), str):
            ids.add(cursor["last_interaction_id"])
    return ids


def update_manifest(path: Path | None, changes: dict, absent: set[str]) -> None:
    manifest = read_json(path) if path is not None and path.exists() else None
    if not isinstance(manifest, dict):
        return
    before = copy.deepcopy(manifest)
    if changes:
        sha = dict(manifest.get("sha256") or {})
        sha.update({name: changes[key] for name, _, key in SPLITS if key in changes})
        manifest.update(sha256=sha, user_hashes=changes["user_hashes"], counts=changes["counts"])
    for key in ("cursor", "previous_cursor"):
        if key in manifest:
            manifest[key] = scrub_cursor(manifest[key], absent)
    if manifest != before:
        atomic_write_json(path, manifest)


# --- tainted adapters on disk -------------------------------------------------------------------------------
def delete_tainted_weights(settings: Settings, doc: dict, user_hash: str | None = None) -> list[str]:
    """Delete the weight files (and checkpoints) of every tainted adapter, keep its metadata, and scrub the user's
    hash from every adapter's lineage.json. Idempotent: a forget killed midway is finished by the next one."""
    deleted = []
    for entry in registry.adapters(doc):
        folder = registry.confined(settings, entry.path or f"adapters/{entry.version}")
        if user_hash is not None:
            scrub_lineage(folder / "lineage.json", user_hash)
        if entry.status == "tainted" and folder.is_dir() and _remove_weights(folder):
            deleted.append(entry.version)
    return deleted


def _remove_weights(folder: Path) -> bool:
    removed = False
    for item in sorted(folder.iterdir()):
        if item.is_symlink():
            continue
        if item.is_dir() and item.name.startswith("checkpoint"):
            shutil.rmtree(item)
            removed = True
        elif item.is_file() and item.suffix in WEIGHT_SUFFIXES:
            item.unlink()
            removed = True
    return removed


def scrub_lineage(path: Path, user_hash: str) -> None:
    lineage = read_json(path) if path.is_file() else None
    if isinstance(lineage, dict) and user_hash in (lineage.get("user_hashes") or []):
        atomic_write_json(path, {**lineage, "user_hashes": [h for h in lineage["user_hashes"] if h != user_hash]})


def discard_partial_runs(settings: Settings, snapshot_ids: set[str]) -> list[str]:
    """Unfinished training runs (`adapters/.<version>.partial/`) on a snapshot that held the user: resuming one
    would register weights trained on the forgotten data. Only folders with the tool's name and run file."""
    removed = []
    for folder in sorted(settings.adapters_dir.glob(".*.partial")) if settings.adapters_dir.is_dir() else []:
        state = read_json(folder / "run.json") if (folder / "run.json").is_file() else None
        if folder.is_dir() and isinstance(state, dict) and (state.get("snapshot") or {}).get("id") in snapshot_ids:
            shutil.rmtree(folder)
            removed.append(folder.name)
    return removed


def stop_tainted_ab_test(settings: Settings, doc: dict) -> dict | None:
    """Stop a running A/B test whose candidate (or champion) is now tainted. Caller holds the registry lock."""
    from ..monitor import ab

    test = ab.load_test(settings)
    if not test or test.get("status") != ab.RUNNING:
        return None
    tainted = [v for v in (test.get("candidate"), test.get("champion"))
               if v and registry.adapter_status(doc, v) == "tainted"]
    if not tainted:
        return None
    stopped = ab.stopped(test, reason=f"adapter {', '.join(tainted)} trained on data of a forgotten user")
    atomic_write_json(ab.state_file(settings), stopped)
    return stopped


# --- forget -----------------------------------------------------------------------------------------------
@dataclass
class ForgetReport:
    interactions: int = 0
    feedback_events: int = 0
    snapshot_examples: int = 0
    snapshots: list[str] = field(default_factory=list)
    adapters_tainted: list[str] = field(default_factory=list)
    weights_deleted: list[str] = field(default_factory=list)
    partial_runs_discarded: list[str] = field(default_factory=list)
    generation_rows: int = 0
    damaged_lines: int = 0
    champion_move: dict | None = None
    ab_test_stopped: str | None = None

    @property
    def found_nothing(self) -> bool:
        return not (self.interactions or self.feedback_events or self.snapshots or self.adapters_tainted
                    or self.weights_deleted or self.damaged_lines)

    def to_dict(self) -> dict:
        return {"interactions": self.interactions, "feedback_events": self.feedback_events,
                "snapshot_examples": self.snapshot_examples, "snapshots": list(self.snapshots),
                "adapters_tainted": list(self.adapters_tainted), "weights_deleted": list(self.weights_deleted),
                "partial_runs_discarded": list(self.partial_runs_discarded),
                "generation_rows": self.generation_rows, "damaged_lines": self.damaged_lines,
                "ab_test_stopped": self.ab_test_stopped,
                "champion": None if self.champion_move is None else {k: self.champion_move[k] for k in ("from", "to")}}


def forget_user(settings: Settings, user_id: str) -> ForgetReport:
    """Remove one user everywhere: raw log, snapshots, generation metrics, counters, knowledge, cursors, registry
    and lineage hashes; taint and delete the weights of the adapters trained on them; log it."""
    user_hash = user_hash_of(settings, user_id)
    cipher = cipher_from_env()
    report = ForgetReport()
    # the train lock too: a run in progress would register an adapter from the user's examples, untainted
    with workspace_lock(settings.lock_dir, "train", wait=LOCK_WAIT_S), \
            workspace_lock(settings.lock_dir, "curate", wait=LOCK_WAIT_S), registry.locked(settings):
        doc = registry.load(settings)
        files = all_snapshot_files(settings, doc)
        remove_stale_temp_files(settings.curated_dir)
        after = _forget_in_files(settings, doc, files, user_hash, cipher, report)
        report.adapters_tainted = taint_adapters(after, user_hash, set(report.snapshots))
        report.champion_move = retire_tainted_champion(after)
        if after != doc:
            atomic_write_json(settings.registry_file, registry.validate(after))
        report.weights_deleted = delete_tainted_weights(settings, after, user_hash)
        report.partial_runs_discarded = discard_partial_runs(settings, set(report.snapshots))
        stopped = stop_tainted_ab_test(settings, after)
        report.ab_test_stopped = stopped["id"] if stopped else None
    if not report.found_nothing:
        registry.log_event(settings, "forget", subject=subject_tag(user_hash), **report.to_dict())
        if stopped:
            registry.log_event(settings, "ab_stop", test_id=stopped["id"], candidate=stopped.get("candidate"),
                               champion=stopped.get("champion"), promoted=False, reasons=[stopped["reason"]])
    return report


def _forget_in_files(settings: Settings, doc: dict, files: dict, user_hash: str, cipher, report: ForgetReport) -> dict:
    """Prepare every rewrite, then commit them; returns the registry document to write."""
    watched = cursor_ids(doc)
    recount = Recount(settings, cipher, watched)
    with _lock_if_exists(settings.raw_log):
        raw = prepare_raw_log(settings, lambda r: r.get("user_hash") == user_hash, recount)
        snapshots = {sid: prepare_snapshot(paths, user_hash) for sid, paths in files.items()}
        pending = [raw, *(r for rewrites in snapshots.values() for r in rewrites.values())]
        with prepared(*pending), _lock_if_exists(settings.generation_metrics):
            metrics = prepare_generation_metrics(settings, recount.latest)
            with prepared(metrics):
                absent = watched - recount.present_watched
                after, manifests = _snapshot_entries(doc, snapshots, user_hash, absent, report)
                if after != doc or raw.changed:
                    plan = Commit(raw, snapshots, metrics, recount, manifests, files, absent)
                    report.generation_rows = plan.run()
    report.interactions, report.feedback_events = raw.dropped[INTERACTION], raw.dropped[FEEDBACK]
    report.damaged_lines = raw.damaged
    return after


def _snapshot_entries(doc: dict, snapshots: dict[str, dict[str, Rewrite]], user_hash: str, absent: set[str],
                      report: ForgetReport) -> tuple[dict, dict[str, dict]]:
    """The registry after scrubbing every snapshot entry (pure), and the manifest changes per snapshot."""
    after, manifests = copy.deepcopy(doc), {}
    for snap in after["snapshots"]:
        if snap.get("cursor") is not None:
            snap["cursor"] = scrub_cursor(snap["cursor"], absent)
        changes = snapshot_changes(snap, snapshots[snap["id"]], user_hash)
        if changes is not None:
            report.snapshot_examples += changes.pop("_removed")
            report.snapshots.append(snap["id"])
            snap.update(changes)
        manifests[snap["id"]] = changes or {}
    return after, manifests


@dataclass
class Commit:
    """The commit phase, in an order a rerun can finish: derived files first, the raw log last (the registry,
    written by the caller, comes after it)."""

    raw: Rewrite
    snapshots: dict[str, dict[str, Rewrite]]
    metrics: Rewrite
    recount: Recount
    manifests: dict[str, dict]
    files: dict[str, dict[str, Path | None]]
    absent: set[str]

    def run(self) -> int:
        self.metrics.commit()
        for snapshot_id, rewrites in self.snapshots.items():
            for rewrite in rewrites.values():
                rewrite.commit()
            update_manifest(self.files[snapshot_id]["manifest"], self.manifests[snapshot_id], self.absent)
        self.recount.write()
        self.raw.commit()
        return self.metrics.total_dropped


# --- retention --------------------------------------------------------------------------------------------
def _older_than(cutoff: datetime) -> Callable[[dict], bool]:
    def old(record: dict) -> bool:
        if record.get("type") not in (INTERACTION, FEEDBACK) or not isinstance(record.get("created_at"), str):
            return False  # no readable time: keep rather than guess
        try:
            return parse_time(record["created_at"]) < cutoff
        except ValueError:
            return False

    return old


def drop_expired(settings: Settings, days: int, now: datetime | None = None) -> Counter:
    """Drop raw interactions (and their feedback) older than `days`, plus damaged lines; recount what is derived
    from the log. The caller holds the `curate` lock. Returns the counts by record type (and "damaged")."""
    if days <= 0:
        raise InputError(f"--days must be at least 1 (got {days})", "0 keeps everything: simply don't run retention")
    cutoff = (now or datetime.now(UTC)) - timedelta(days=days)
    if not settings.raw_log.exists():
        return Counter()
    recount = Recount(settings, cipher_from_env())
    with file_lock(settings.raw_log):
        raw = prepare_raw_log(settings, _older_than(cutoff), recount)
        with prepared(raw), _lock_if_exists(settings.generation_metrics):
            metrics = prepare_generation_metrics(settings, recount.latest) if raw.changed else Rewrite(settings.raw_log)
            with prepared(metrics):
                if raw.changed:
                    metrics.commit()
                    recount.write()
                    raw.commit()
    dropped = Counter({INTERACTION: raw.dropped[INTERACTION], FEEDBACK: raw.dropped[FEEDBACK]})
    if raw.damaged:
        dropped["damaged"] = raw.damaged
    if raw.changed:
        registry.log_event(settings, "retention", days=days, cutoff=cutoff.isoformat(),
                           interactions=dropped[INTERACTION], feedback_events=dropped[FEEDBACK],
                           damaged_lines=raw.damaged, generation_rows=metrics.total_dropped)
    return dropped


def apply_retention(settings: Settings, days: int, now: datetime | None = None) -> Counter:
    """`cl retention`: drop_expired under the `curate` lock (curate itself calls drop_expired, holding it)."""
    with workspace_lock(settings.lock_dir, "curate", wait=LOCK_WAIT_S):
        return drop_expired(settings, days, now)


# --- export (right of access) -----------------------------------------------------------------------------
def export_user(settings: Settings, user_id: str) -> Iterator[dict]:
    """Everything stored about one user, one `{"category", "record"}` dict per item. Lines of the user's that
    the shared parser rejects are exported as they are stored (`unreadable_record`)."""
    user_hash = user_hash_of(settings, user_id)
    doc = registry.load(settings)
    files = all_snapshot_files(settings, doc)
    cipher = cipher_from_env()
    yield from _export_raw(settings.raw_log, user_hash, cipher)
    snapshot_ids = set()
    for snap in doc["snapshots"]:
        for name, _, _ in SPLITS:
            path = files[snap["id"]][name]
            for _, record in iter_jsonl(path) if path is not None else ():
                if isinstance(record, dict) and _mentions(record, user_hash):
                    snapshot_ids.add(snap["id"])
                    yield {"category": "snapshot_example", "snapshot": snap["id"], "split": name,
                           "record": open_messages(record, cipher)}
    for entry in registry.adapters(doc):
        if user_hash in entry.user_hashes or entry.snapshot_id in snapshot_ids:
            yield {"category": "adapter", "record": _adapter_summary(entry)}


def _export_raw(path: Path, user_hash: str, cipher=None) -> Iterator[dict]:
    theirs = {r.id for _, r in read_log(path) if isinstance(r, Interaction) and r.user_hash == user_hash}
    report = ReadReport()
    joined: dict[str, Feedback] = {}
    for _, record in read_log(path, cipher=cipher, open_texts=True):
        if isinstance(record, FeedbackEvent) and record.interaction_id in theirs:
            key = record.interaction_id
            joined[key] = joined.get(key, Feedback()).merged(record.feedback)
    for _, record in read_log(path, report, cipher, open_texts=True):
        if isinstance(record, Interaction) and record.id in theirs:
            merged = record.feedback.merged(joined.get(record.id, Feedback()))
            yield {"category": "interaction", "record": {**record.to_dict(), "joined_feedback": merged.to_dict()}}
        elif isinstance(record, FeedbackEvent) and record.user_hash == user_hash:
            yield {"category": "feedback", "record": record.to_dict()}
    yield from _unreadable_of(path, user_hash, {n for n, _ in report.bad_lines})


def _unreadable_of(path: Path, user_hash: str, numbers: set[int]) -> Iterator[dict]:
    if not numbers:
        return
    for number, record in iter_jsonl(path):
        if number in numbers and isinstance(record, dict) and record.get("user_hash") == user_hash:
            yield {"category": "unreadable_record", "record": record}


def _adapter_summary(entry: registry.Adapter) -> dict:
    keys = ("status", "created_at", "snapshot", "base_model", "tainted_at", "tainted_reason")
    return {"version": entry.version, **{k: entry.record[k] for k in keys if k in entry.record}}
