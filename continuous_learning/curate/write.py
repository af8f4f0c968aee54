"""Stage 8, write: the snapshot's train and eval files in time order, its manifest with the next cursor, and its
registry entry, each written atomically."""
from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import replace
from datetime import datetime
from typing import Any

from .. import registry
from ..core.settings import Settings
from ..storage.crypto import cipher_from_env
from ..storage.store import atomic_write_json, atomic_write_lines, dumps_line
from .cursor import Cursor
from .examples import Example, seal_record
from .pool import ExamplePool
from .snapshots import mark_pending, new_snapshot_id
from .state import CurateContext, Pool


def write(pool: Pool, ctx: CurateContext) -> Pool:
    """Write and register the snapshot: the train rows with the replay, and the eval rows. Ends the run."""
    counts = {**pool.manifest["counts"], "new_examples": len(pool.rows), "replayed": len(pool.replay),
              "train": len(pool.train) + len(pool.replay), "eval": len(pool.held),
              "replay_sources_missing": pool.tally["replay_sources_missing"]}
    manifest = {**pool.manifest, "counts": counts, "cursor": next_cursor(pool, ctx).to_dict(),
                "replay_pool": [s["id"] for s in ctx.snapshots] if pool.replay else []}
    train = _in_file_order(pool.examples, pool.train, pool.replay)
    held = _in_file_order(pool.examples, pool.held, [])
    return replace(pool, result=write_snapshot(ctx.settings, ctx.doc, train, held, manifest, ctx.now))


def next_cursor(pool: Pool, ctx: CurateContext) -> Cursor:
    """Where this snapshot stops: the newest interaction and feedback seen, and the turns the cap held back."""
    import numpy as np

    scan, examples, new = ctx.scan, pool.examples, pool.rows
    have_feedback = scan.watermark.top is not None
    _, recorded = np.unique(examples.cols["recorded"][new], return_inverse=True)
    newest = examples.record(int(new[int(np.argmax(recorded))]))  # the first of the latest, as max() picks
    return Cursor(
        recorded_at=pool.watermark.top_text,
        recorded_ids=pool.watermark.edge(),
        feedback_at=scan.watermark.top_text if have_feedback else ctx.cursor.feedback_at,
        feedback_ids=scan.watermark.edge() if have_feedback else ctx.cursor.feedback_ids,
        last_interaction_id=newest["source_ids"][0],
        deferred_ids=sorted({s for row in pool.capped.tolist() for s in examples.record(row)["source_ids"]}),
    )


def _chronological(examples: list[Example]) -> list[Example]:
    """Examples in file order: by (created_at, id)."""
    return sorted(examples, key=lambda e: (e.created_at, e.id))


def write_snapshot(settings: Settings, doc: dict, train: Iterable[dict], eval_records: Iterable[dict],
                   manifest: dict, now: datetime) -> dict:
    """Write train and eval (example records, already in file order, streamed) and the manifest atomically (0600),
    then register the snapshot. Returns the manifest."""
    snapshot_id = new_snapshot_id(settings, {s["id"] for s in doc["snapshots"]}, now)
    folder = settings.curated_dir
    paths = {k: folder / f"{snapshot_id}{suffix}" for k, suffix in
             (("train", ".jsonl"), ("eval", "_eval.jsonl"), ("manifest", "_manifest.json"))}
    cipher = cipher_from_env()
    seen_users: set[str] = set()
    written = Counter()
    pending = mark_pending(folder, snapshot_id)  # before any file: proves to the next run that they are ours

    def lines(records: Iterable[dict], key: str) -> Iterator[bytes]:
        for record in records:
            written[key] += 1
            seen_users.update(record["user_hashes"])
            yield dumps_line(seal_record(record, cipher))

    sha = {"train": atomic_write_lines(paths["train"], lines(train, "train")),
           "eval": atomic_write_lines(paths["eval"], lines(eval_records, "eval"))}
    relative = {k: str(p.relative_to(settings.home)) for k, p in paths.items()}
    users = sorted(seen_users)
    train_count, eval_count = written["train"], written["eval"]
    manifest = {**manifest, "status": "created", "id": snapshot_id, "files": relative, "sha256": sha,
                "user_hashes": users}
    atomic_write_json(paths["manifest"], manifest)
    entry = {
        "id": snapshot_id, "file": relative["train"], "eval_file": relative["eval"], "manifest": relative["manifest"],
        "sha256": sha["train"], "eval_sha256": sha["eval"], "counts": manifest["counts"], "note": manifest["note"],
        "cursor": manifest["cursor"], "created_at": manifest["created_at"], "mode": manifest["mode"],
        "train_examples": train_count, "eval_examples": eval_count, "user_hashes": users,
    }
    registry.update(settings, lambda d: registry.add_snapshot(d, entry), "snapshot_created", snapshot=snapshot_id,
                    train_examples=train_count, eval_examples=eval_count, note=manifest["note"])
    pending.unlink(missing_ok=True)
    return manifest


def pooled_chronological(pool: ExamplePool, rows: Any) -> Any:
    """Rows sorted by (created_at, id), as `_chronological` sorts examples."""
    import numpy as np

    if len(rows) == 0:
        return rows
    created_at = np.where(pool.cols["same_time"][rows], pool.cols["recorded"][rows], pool.cols["created"][rows])
    _, created = np.unique(created_at, return_inverse=True)
    return rows[np.lexsort((pool.cols["id"][rows], created))]


def _in_file_order(pool: ExamplePool, rows: Any, others: list[Example]) -> Iterator[dict]:
    """The records of pooled rows and of other examples, merged in `_chronological` order, read one at a time."""
    pooled = (pool.record(row) for row in pooled_chronological(pool, rows).tolist())
    others_in_order = (e.to_record() for e in _chronological(others))
    return heapq.merge(pooled, others_in_order, key=lambda r: (r["created_at"], r["id"]))
