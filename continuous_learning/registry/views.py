"""Typed, read-only views over the registry document, so callers ask `view.can_serve` instead of indexing
`doc["adapters"][v]["status"]`. The document stays a plain dict on disk; these are built from it on demand."""
from __future__ import annotations

from dataclasses import dataclass, field
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

    @property
    def can_serve(self) -> bool:
        return self.status not in UNUSABLE_STATUSES

    @classmethod
    def from_entry(cls, version: str, entry: dict[str, Any]) -> Adapter:
        snapshot = entry.get("snapshot") or {}
        return cls(version=version, status=entry.get("status", "candidate"), path=entry.get("path", ""),
                   sha256=dict(entry.get("sha256") or {}), snapshot_id=snapshot.get("id"),
                   parent=entry.get("parent"), evals=tuple(entry.get("evals") or ()))


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


def adapters(doc: dict[str, Any]) -> list[Adapter]:
    """Every registered adapter, in registration order."""
    return [Adapter.from_entry(version, entry) for version, entry in doc.get("adapters", {}).items()]


def adapter_view(doc: dict[str, Any], version: str) -> Adapter | None:
    entry = doc.get("adapters", {}).get(version)
    return Adapter.from_entry(version, entry) if entry is not None else None


def champion(doc: dict[str, Any]) -> Adapter | None:
    """The champion adapter, or None when the base model answers."""
    version = doc.get("champion")
    return adapter_view(doc, version) if version else None


def snapshots(doc: dict[str, Any]) -> list[Snapshot]:
    return [Snapshot.from_entry(entry) for entry in doc.get("snapshots", [])]
