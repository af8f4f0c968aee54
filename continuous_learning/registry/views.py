"""Typed, read-only views over the registry document, so callers ask `view.can_serve` instead of indexing
`doc["adapters"][v]["status"]`. The document stays a plain dict on disk; these are built from it on demand."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

UNUSABLE_STATUSES = ("failed", "tainted")  # never served, never a rollback target


@dataclass(frozen=True)
class Adapter:
    version: str
    status: str
    path: str
    sha256: dict[str, str] = field(default_factory=dict)
    snapshot_id: str | None = None
    parent: str | None = None
    evals: tuple[dict[str, Any], ...] = ()
    created_at: str | None = None
    note: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    base_model: dict[str, Any] = field(default_factory=dict)
    warm_start_from: str | None = None
    user_hashes: tuple[str, ...] = ()
    # the whole entry, read-only, for the fields only one caller reads (export of a user's data)
    record: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def can_serve(self) -> bool:
        return self.status not in UNUSABLE_STATUSES

    @property
    def latest_eval(self) -> dict[str, Any] | None:
        return self.evals[-1] if self.evals else None

    @classmethod
    def from_entry(cls, version: str, entry: dict[str, Any]) -> Adapter:
        snapshot = entry.get("snapshot") or {}
        warm = entry.get("warm_start")
        return cls(version=version, status=entry.get("status", "candidate"), path=entry.get("path", ""),
                   sha256=dict(entry.get("sha256") or {}), snapshot_id=snapshot.get("id"),
                   parent=entry.get("parent"), evals=tuple(entry.get("evals") or ()),
                   created_at=entry.get("created_at"), note=entry.get("note"),
                   metrics=dict(entry.get("metrics") or {}), base_model=dict(entry.get("base_model") or {}),
                   warm_start_from=warm.get("from") if isinstance(warm, dict) else None,
                   user_hashes=tuple(entry.get("user_hashes") or ()), record=MappingProxyType(entry))


@dataclass(frozen=True)
class Snapshot:
    id: str
    file: str
    eval_file: str | None = None
    sha256: str | None = None

    @classmethod
    def from_entry(cls, entry: dict[str, Any]) -> Snapshot:
        return cls(id=entry["id"], file=entry.get("file", ""), eval_file=entry.get("eval_file"),
                   sha256=entry.get("sha256"))


def version_key(version: str) -> tuple:
    """Sort key for versions: numeric parts compare as numbers ("1.10.0" after "1.9.0")."""
    try:
        return tuple(int(p) for p in version.split("."))
    except ValueError:
        return (version,)


def adapters(doc: dict[str, Any]) -> list[Adapter]:
    """Every registered adapter, in registration order."""
    return [Adapter.from_entry(version, entry) for version, entry in doc.get("adapters", {}).items()]


def adapters_by_version(doc: dict[str, Any]) -> list[Adapter]:
    """Every registered adapter, oldest version first."""
    return sorted(adapters(doc), key=lambda a: version_key(a.version))


def serving_adapters(doc: dict[str, Any]) -> list[Adapter]:
    """The adapters that may serve (neither failed nor tainted), oldest version first."""
    return [a for a in adapters_by_version(doc) if a.can_serve]


def adapter_view(doc: dict[str, Any], version: str | None) -> Adapter | None:
    """The adapter registered as `version`, or None when there is none (or `version` is None)."""
    entry = doc.get("adapters", {}).get(version) if version is not None else None
    return Adapter.from_entry(version, entry) if entry is not None and version is not None else None


def adapter_status(doc: dict[str, Any], version: str | None) -> str | None:
    """The status of `version`, or None when it is not registered."""
    view = adapter_view(doc, version)
    return view.status if view is not None else None


def champion(doc: dict[str, Any]) -> Adapter | None:
    """The champion adapter, or None when the base model answers."""
    version = doc.get("champion")
    return adapter_view(doc, version) if version else None


def snapshots(doc: dict[str, Any]) -> list[Snapshot]:
    return [Snapshot.from_entry(entry) for entry in doc.get("snapshots", [])]
