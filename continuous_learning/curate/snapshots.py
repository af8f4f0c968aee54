"""The snapshot files in `data/curated/` as the registry lists them: their paths, the interactions they hold, new
snapshot ids, and the `.pending` markers that let a run remove what a killed one left."""
from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from .. import registry
from ..core.settings import Settings
from ..storage.store import FILE_MODE, ensure_dir, fsync_dir, iter_jsonl, remove_stale_temp_files


def snapshot_paths(settings: Settings, snapshots: list[dict],
                   keys: tuple[str, ...]) -> Iterator[tuple[str, Path | None]]:
    """(snapshot id, path) of each named file of each snapshot; the path is None when the file is gone."""
    for snap in snapshots:
        for key in keys:
            if snap.get(key):
                path = registry.confined(settings, snap[key])
                yield snap["id"], path if path.exists() else None


def ids_in_snapshots(settings: Settings, snapshots: list[dict], wanted: set[str]) -> set[str]:
    """Which of `wanted` interaction ids are already in a snapshot (train or eval)."""
    found: set[str] = set()
    if not wanted:
        return found
    for _, path in snapshot_paths(settings, snapshots, ("file", "eval_file")):
        for _, record in iter_jsonl(path) if path else ():
            if isinstance(record, dict):
                found.update(s for s in record.get("source_ids") or [] if s in wanted)
    return found


def new_snapshot_id(settings: Settings, taken: set[str], now: datetime) -> str:
    """curated_YYYYMMDD_HHMMSS, with _2, _3... when that second is already used."""
    base = f"curated_{now.astimezone(UTC):%Y%m%d_%H%M%S}"
    candidate, n = base, 1
    while candidate in taken or (settings.curated_dir / f"{candidate}.jsonl").exists():
        n += 1
        candidate = f"{base}_{n}"
    return candidate


def mark_pending(folder: Path, snapshot_id: str) -> Path:
    """`.<snapshot id>.pending`, written before a snapshot's files and removed once it is registered."""
    marker = ensure_dir(folder) / f".{snapshot_id}.pending"
    os.close(os.open(marker, os.O_WRONLY | os.O_CREAT, FILE_MODE))
    fsync_dir(folder)
    return marker


def remove_orphans(settings: Settings, snapshots: list[dict]) -> int:
    """Remove what a curate killed before it registered its snapshot left: our temp files, and the files of a
    snapshot whose `.pending` marker is still there while the registry does not list it. Nothing else is ever
    deleted: a snapshot file without a marker may be listed in a registry we cannot see (moved, restored from an
    older backup), and other files in the folder are not ours. Called under the curate lock."""
    folder = settings.curated_dir
    removed = remove_stale_temp_files(folder)
    registered = {s["id"] for s in snapshots}
    for marker in sorted(folder.glob(".curated_*.pending")) if folder.exists() else []:
        snapshot_id = marker.name[1:].removesuffix(".pending")
        if not registry.SNAPSHOT_FILE.match(f"{snapshot_id}.jsonl"):
            continue  # not a name this tool gives its snapshots
        if snapshot_id not in registered:
            for suffix in (".jsonl", "_eval.jsonl", "_manifest.json"):
                path = folder / f"{snapshot_id}{suffix}"
                if path.is_file() and not path.is_symlink():
                    path.unlink()
                    removed += 1
        marker.unlink(missing_ok=True)
    return removed
