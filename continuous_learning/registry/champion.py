"""Promotion and rollback applied to `adapters/registry.json`: the pure transitions run through `update` under the
lock, after the adapter's files are checked against their recorded sha256. Nothing here imports torch, so
`cl rollback` stays well under a second."""
from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

from ..core.errors import RegistryError
from ..core.settings import Settings
from .document import confined, load, update
from .integrity import file_sha256
from .transitions import adapter, label, move_champion, promote, record_eval, rollback_target
from .views import Adapter


def verify_adapter_files(settings: Settings, entry: dict | Adapter) -> Path:
    """The adapter's folder, after checking every recorded file against its sha256 (an entry or its view)."""
    if isinstance(entry, Adapter):
        entry = {"version": entry.version, "path": entry.path, "sha256": entry.sha256}
    version = entry.get("version", "?")
    folder = confined(settings, entry.get("path") or f"adapters/{version}")
    expected = entry.get("sha256") or {}
    if not folder.is_dir():
        raise RegistryError(f"adapter {version}: folder {folder} is missing",
                            "restore it from a backup, or roll back to another version with --to")
    if not expected:
        raise RegistryError(f"adapter {version}: the registry records no sha256 for its files",
                            "re-register it by training again")
    for name, digest in sorted(expected.items()):
        path = confined(settings, folder / name)
        if not path.is_file():
            raise RegistryError(f"adapter {version}: file {name} is missing from {folder}",
                                "restore the folder from a backup, or choose another version")
        if file_sha256(path) != digest:
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


def promote_version(settings: Settings, version: str, reason: str, forced: bool = False,
                    expected_champion: Any = _ANY) -> dict:
    """Promote after verifying the adapter's files. Returns {"from", "to"}.

    `expected_champion`: the champion a gate compared against; if another process has moved it since, refuse."""
    doc = load(settings)
    old = doc["champion"]
    if expected_champion is not _ANY and old != expected_champion:
        raise RegistryError(
            f"the champion changed to {label(old)} while {version} was compared with {label(expected_champion)}",
            "run 'cl eval' again",
        )
    promote(copy.deepcopy(doc), version, reason, forced)  # dry run: refusals come before any file work
    verify_adapter_files(settings, adapter(doc, version))
    guard = _unchanged_champion(old)
    update(
        settings, lambda d: promote(guard(d), version, reason, forced), "promote",
        **{"from": old, "to": version, "reason": reason, "forced": forced},
    )
    return {"from": old, "to": version}


def rollback_champion(settings: Settings, steps: int = 1, to: str | None = None, reason: str = "") -> dict:
    """Roll the champion pointer back; the target's files are checked before the pointer moves.

    Returns {"from", "to", "seconds"}."""
    started = time.perf_counter()
    doc = load(settings)
    old, target = doc["champion"], rollback_target(doc, steps, to)
    if target is not None:
        verify_adapter_files(settings, adapter(doc, target))
    guard = _unchanged_champion(old)
    update(
        settings, lambda d: move_champion(guard(d), target, "rollback", reason or "rollback"), "rollback",
        **{"from": old, "to": target, "reason": reason or "rollback"},
    )
    return {"from": old, "to": target, "seconds": time.perf_counter() - started}


def record_eval_result(settings: Settings, version: str | None, result: dict) -> None:
    update(
        settings,
        lambda doc: record_eval(doc, version, result),
        "eval",
        version=version,
        accuracy=result.get("accuracy"),
        general_accuracy=result.get("general_accuracy"),
    )
