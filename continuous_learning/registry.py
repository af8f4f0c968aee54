"""The registry: snapshots, adapter versions, the champion pointer and its history.

`adapters/registry.json` is the only shared mutable state. Operations on the document are pure functions
(doc in, doc out); `update()` is the one way to change the file: lock, load, apply, validate, atomic write,
and a line in `logs/learning_events.jsonl`.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

from .errors import RegistryError
from .records import SCHEMA_VERSION, learning_event, utc_now
from .settings import Settings
from .store import append_jsonl, atomic_write_json, read_json, remove_stale_temp_files, workspace_lock

ADAPTER_STATUSES = ("candidate", "champion", "archived", "failed", "tainted")


def empty_registry() -> dict:
    return {"schema_version": SCHEMA_VERSION, "snapshots": [], "adapters": {}, "champion": None, "history": []}


def validate(doc: Any, where: str = "adapters/registry.json") -> dict:
    """Reject a registry edited into nonsense, naming the bad field."""
    fix = "restore it from git/backup, or move it away to start a new registry"

    def bad(field_name: str, what: str) -> RegistryError:
        return RegistryError(f"{where}: field '{field_name}' {what}", fix)

    if not isinstance(doc, dict):
        raise RegistryError(f"{where}: expected a JSON object", fix)
    for key, typ in (("snapshots", list), ("adapters", dict), ("history", list)):
        if not isinstance(doc.get(key), typ):
            raise bad(key, f"must be a {typ.__name__}")
    if doc.get("schema_version") != SCHEMA_VERSION:
        raise bad("schema_version", f"must be {SCHEMA_VERSION}")
    champion = doc.get("champion")
    if champion is not None and champion not in doc["adapters"]:
        raise bad("champion", f"names '{champion}', which is not in 'adapters'")
    for i, snap in enumerate(doc["snapshots"]):
        if not isinstance(snap, dict) or not isinstance(snap.get("id"), str):
            raise bad(f"snapshots[{i}].id", "must be a string")
    for version, entry in doc["adapters"].items():
        if not isinstance(entry, dict):
            raise bad(f"adapters.{version}", "must be an object")
        if entry.get("status") not in ADAPTER_STATUSES:
            raise bad(f"adapters.{version}.status", f"must be one of {', '.join(ADAPTER_STATUSES)}")
    return doc


def load(settings: Settings) -> dict:
    doc = read_json(settings.registry_file)
    return empty_registry() if doc is None else validate(doc, str(settings.registry_file))


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
