"""The registry document: snapshots, adapter versions, the champion pointer and its history.

`adapters/registry.json` is the only shared mutable state. Operations on the document are pure functions
(doc in, doc out); `update()` is the one way to change the file: lock, load, apply, validate, atomic write,
and a line in `logs/learning_events.jsonl`.
"""
from __future__ import annotations

import copy
import re
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..core.errors import RegistryError
from ..core.records import SCHEMA_VERSION, learning_event, utc_now
from ..core.settings import Settings
from ..storage.store import append_jsonl, atomic_write_json, read_json, remove_stale_temp_files, workspace_lock

ADAPTER_STATUSES = ("candidate", "champion", "archived", "failed", "tainted")
REGISTRY_SCHEMA_VERSION = SCHEMA_VERSION
SNAPSHOT_FILE = re.compile(r"^(curated_\d{8}_\d{6}(?:_\d+)?)(\.jsonl|_eval\.jsonl|_manifest\.json)$")
VERSION_DIR = re.compile(r"^\d+\.\d+\.\d+$")
ADAPTER_MARKERS = ("lineage.json",)  # written by every `cl train` into its adapter folder
FIX = ("restore it from git or a backup; to start a new registry, move it away together with data/curated/ "
       "and the adapters/<version>/ folders")


def empty_registry() -> dict:
    return {"schema_version": REGISTRY_SCHEMA_VERSION, "snapshots": [], "adapters": {}, "champion": None, "history": []}


# --- migrations: ordered, named, applied on open (the next update writes the migrated document) ---------
def _m1_unversioned(doc: dict) -> dict:
    """Registries written before `schema_version` existed: add the version and any missing top-level key."""
    return {**empty_registry(), **doc, "schema_version": 1}


MIGRATIONS: list[tuple[int, str, Callable[[dict], dict]]] = [(0, "0001_unversioned_registry", _m1_unversioned)]


def migrate(doc: dict, where: str = "adapters/registry.json") -> dict:
    """Bring an older registry document up to REGISTRY_SCHEMA_VERSION, one named step at a time."""
    version = doc.get("schema_version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise RegistryError(f"{where}: field 'schema_version' must be an integer (got {version!r})", FIX)
    if version > REGISTRY_SCHEMA_VERSION:
        raise RegistryError(f"{where}: schema_version {version} was written by a newer cl (this one knows "
                            f"{REGISTRY_SCHEMA_VERSION})", "upgrade cl, or restore an older registry")
    for source, _name, step in MIGRATIONS:
        if version == source:
            doc = step(doc)
            version = doc["schema_version"]
    return doc


# --- validation: every field the code reads, named when wrong --------------------------------------------
_SNAPSHOT_FIELDS = {"id": str, "file": str, "eval_file": str, "manifest": str, "sha256": str, "eval_sha256": str,
                    "user_hashes": list, "counts": dict, "cursor": dict, "created_at": str, "note": str}
_ADAPTER_FIELDS = {"version": str, "path": str, "sha256": dict, "user_hashes": list, "snapshot": dict, "evals": list,
                   "base_model": dict, "parent": str, "metrics": dict, "created_at": str, "lineage": dict}


def _bad(field_name: str, what: str, where: str) -> RegistryError:
    return RegistryError(f"{where}: field '{field_name}' {what}", FIX)


def _check_fields(entry: Any, spec: Mapping[str, type], prefix: str, where: str) -> None:
    if not isinstance(entry, dict):
        raise _bad(prefix, "must be an object", where)
    for key, typ in spec.items():
        value = entry.get(key)
        if value is not None and (not isinstance(value, typ) or isinstance(value, bool)):
            raise _bad(f"{prefix}.{key}", f"must be a {typ.__name__} (got {type(value).__name__})", where)
    for key in ("user_hashes",):
        if not all(isinstance(h, str) for h in entry.get(key) or []):
            raise _bad(f"{prefix}.{key}", "must be a list of strings", where)


def _check_adapter(version: str, entry: Any, where: str) -> None:
    prefix = f"adapters.{version}"
    _check_fields(entry, _ADAPTER_FIELDS, prefix, where)
    if entry.get("status") not in ADAPTER_STATUSES:
        raise _bad(f"{prefix}.status", f"must be one of {', '.join(ADAPTER_STATUSES)}", where)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in (entry.get("sha256") or {}).items()):
        raise _bad(f"{prefix}.sha256", "must map file names to sha256 strings", where)
    snapshot = entry.get("snapshot") or {}
    if snapshot.get("id") is not None and not isinstance(snapshot["id"], str):
        raise _bad(f"{prefix}.snapshot.id", "must be a string", where)
    if not all(isinstance(e, dict) for e in entry.get("evals") or []):
        raise _bad(f"{prefix}.evals", "must be a list of objects", where)


def validate(doc: Any, where: str = "adapters/registry.json") -> dict:
    """Reject a registry edited into nonsense, naming the bad field."""
    if not isinstance(doc, dict):
        raise RegistryError(f"{where}: expected a JSON object", FIX)
    for key, typ in (("snapshots", list), ("adapters", dict), ("history", list)):
        if not isinstance(doc.get(key), typ):
            raise _bad(key, f"must be a {typ.__name__}", where)
    if doc.get("schema_version") != REGISTRY_SCHEMA_VERSION:
        raise _bad("schema_version", f"must be {REGISTRY_SCHEMA_VERSION}", where)
    champion = doc.get("champion")
    if champion is not None and (not isinstance(champion, str) or champion not in doc["adapters"]):
        raise _bad("champion", f"names '{champion}', which is not in 'adapters'", where)
    for i, snap in enumerate(doc["snapshots"]):
        _check_fields(snap, _SNAPSHOT_FIELDS, f"snapshots[{i}]", where)
        if not isinstance(snap.get("id"), str):
            raise _bad(f"snapshots[{i}].id", "must be a string", where)
    for version, entry in doc["adapters"].items():
        _check_adapter(version, entry, where)
    for i, move in enumerate(doc["history"]):
        if not isinstance(move, dict):
            raise _bad(f"history[{i}]", "must be an object", where)
    return doc


# --- opening -------------------------------------------------------------------------------------------
def unregistered_evidence(settings: Settings) -> tuple[int, int]:
    """(snapshot files, adapter folders) on disk that only a registry could have listed. Files of a curate
    that had not registered its snapshot yet (its `.pending` marker is still there) do not count."""
    pending = {p.name[1:].removesuffix(".pending") for p in _glob(settings.curated_dir, ".curated_*.pending")}
    snapshots = sum(1 for p in _glob(settings.curated_dir, "curated_*")
                    if (m := SNAPSHOT_FILE.match(p.name)) and m.group(1) not in pending)
    adapters = sum(1 for p in _glob(settings.adapters_dir, "*")
                   if p.is_dir() and VERSION_DIR.match(p.name) and any((p / n).exists() for n in ADAPTER_MARKERS))
    return snapshots, adapters


def _glob(folder: Path, pattern: str) -> list[Path]:
    return sorted(folder.glob(pattern)) if folder.is_dir() else []


def refuse_if_lost(settings: Settings) -> None:
    """A missing registry beside existing snapshots or adapters is a lost registry, not a new workspace:
    refuse, so that nothing treats every file as an orphan."""
    snapshots, adapters = unregistered_evidence(settings)
    if snapshots or adapters:
        raise RegistryError(
            f"{settings.registry_file} is missing, but the workspace holds {snapshots} snapshot file(s) and "
            f"{adapters} adapter folder(s) that only it can account for; nothing was changed",
            "put the registry back (from a backup or git); to really start afresh, first move data/curated/ "
            "and the adapters/<version>/ folders out of the workspace")


def load(settings: Settings) -> dict:
    doc = read_json(settings.registry_file)
    if doc is None:
        refuse_if_lost(settings)
        return empty_registry()
    where = str(settings.registry_file)
    if not isinstance(doc, dict):
        raise RegistryError(f"{where}: expected a JSON object", FIX)
    return validate(migrate(doc, where), where)


def log_event(settings: Settings, kind: str, **details: Any) -> None:
    append_jsonl(settings.learning_events, [learning_event(kind, **details)])


@contextmanager
def locked(settings: Settings):
    """Hold the registry lock (waits up to 30 s: registry changes are short)."""
    with workspace_lock(settings.lock_dir, "registry", wait=30.0):
        remove_stale_temp_files(settings.adapters_dir)
        yield


def update(settings: Settings, change: Callable[[dict], dict], event: str, **details: Any) -> dict:
    """Apply a pure change to the registry atomically; log it. Returns the new document."""
    with locked(settings):
        before = load(settings)
        after = validate(change(copy.deepcopy(before)))
        atomic_write_json(settings.registry_file, after)
    log_event(settings, event, **details)
    return after


# --- snapshots -------------------------------------------------------------------------------------
def add_snapshot(doc: dict, snapshot: dict) -> dict:
    if any(s["id"] == snapshot["id"] for s in doc["snapshots"]):
        raise RegistryError(f"snapshot {snapshot['id']} is already registered")
    doc["snapshots"].append({"registered_at": utc_now(), **snapshot})
    return doc


def latest_snapshot(doc: dict) -> dict | None:
    return doc["snapshots"][-1] if doc["snapshots"] else None


def find_snapshot(doc: dict, snapshot_id: str) -> dict:
    for snap in doc["snapshots"]:
        if snap["id"] == snapshot_id:
            return snap
    raise RegistryError(f"no snapshot '{snapshot_id}'", "list them with 'cl snapshots'")


def confined(settings: Settings, relative: str | Path) -> Path:
    """A path named in the registry or on the command line, refused if it leaves the workspace."""
    path = (settings.home / relative).resolve()
    if not path.is_relative_to(settings.home):
        raise RegistryError(f"path '{relative}' points outside the workspace", "use a version or id listed by the tool")
    return path


# --- adapter versions --------------------------------------------------------------------------------
def _parse_version(text: str) -> tuple[int, int, int]:
    major, minor, patch = (int(p) for p in text.split("."))
    return major, minor, patch


def next_version(doc: dict, base_sha256: str, reregister_of: str | None = None) -> str:
    """Semantic versions: major when the base model changes, minor per training run, patch per re-registration."""
    versions = sorted((_parse_version(v) for v in doc["adapters"]), reverse=True)
    if reregister_of is not None:
        major, minor, _ = _parse_version(reregister_of)
        patch = max((p for (M, m, p) in versions if (M, m) == (major, minor)), default=0)
        return f"{major}.{minor}.{patch + 1}"
    if not versions:
        return "1.0.0"
    latest = versions[0]
    latest_entry = doc["adapters"][".".join(map(str, latest))]
    if latest_entry.get("base_model", {}).get("sha256") != base_sha256:
        return f"{latest[0] + 1}.0.0"
    return f"{latest[0]}.{latest[1] + 1}.0"


def register_adapter(doc: dict, entry: dict) -> dict:
    """Add an adapter version (status 'candidate' or 'failed'); the entry must carry 'version' and 'path'."""
    version = entry["version"]
    if version in doc["adapters"]:
        raise RegistryError(f"adapter version {version} is already registered")
    doc["adapters"][version] = {"created_at": utc_now(), "evals": [], **entry}
    return doc


def champion_entry(doc: dict) -> dict | None:
    return doc["adapters"].get(doc["champion"]) if doc.get("champion") else None
