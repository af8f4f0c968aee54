"""Curate: from the raw interaction log to versioned ChatML training snapshots.

This package owns the chain `run_curate` drives (pipeline.py): pass 1 reads the feedback events (feedback.py),
then the same-signature stages `stage(pool, ctx) -> pool` run over the run's pooled examples (pool.py):
gather (pass 2: `select` each new turn, selection.py) -> dedupe exact -> dedupe near (MinHash + LSH proposes,
exact shingle Jaccard decides, the best-rated survives; minhash.py, dedupe.py) -> cap domains -> take stock ->
split (whole prompt clusters go to one side, so no prompt is in both) -> replay (earlier snapshots' examples)
-> write `data/curated/curated_<ts>.jsonl`, its `_eval.jsonl` and `_manifest.json` atomically and record the
snapshot in the registry. Nothing new to curate: it writes nothing and says why. The incremental cursor
(cursor.py) says where the previous snapshot stopped. numpy is imported inside the functions that use it.
"""
from .cursor import CURSOR_SLACK, Cursor, Watermark, moment_of, previous_cursor
from .examples import KIND_RANK, KIND_WEIGHTS, KINDS, Example
from .feedback import FeedbackScan, FeedbackTable, scan_feedback
from .gather import _plain_unrated_reason
from .minhash import NUM_PERM, NearIndex, _signatures
from .pipeline import STAGES, run_curate
from .pool import ExamplePool, Spool
from .progress import PROGRESS_EVERY, Progress, count_lines
from .replay import choose_replay, earlier_examples, replay_size, sample_replay
from .selection import DROP_REASONS, Rules, blocklist_pattern, content_problem, merge_feedback, select, validate_config
from .snapshots import ids_in_snapshots, mark_pending, new_snapshot_id, remove_orphans, snapshot_paths
from .state import CurateContext, Pool
from .text import ID_CHARS, SHINGLE_CHARS, clean_messages, jaccard, normalise, shingles, short_hash
from .write import write_snapshot

__all__ = [
    "CURSOR_SLACK", "DROP_REASONS", "ID_CHARS", "KINDS", "KIND_RANK", "KIND_WEIGHTS", "NUM_PERM", "PROGRESS_EVERY",
    "SHINGLE_CHARS", "STAGES", "CurateContext", "Cursor", "Example", "ExamplePool", "FeedbackScan", "FeedbackTable",
    "NearIndex", "Pool", "Progress", "Rules", "Spool", "Watermark", "_plain_unrated_reason", "_signatures",
    "blocklist_pattern", "choose_replay", "clean_messages", "content_problem", "count_lines", "earlier_examples",
    "ids_in_snapshots", "jaccard", "mark_pending", "merge_feedback", "moment_of", "new_snapshot_id", "normalise",
    "previous_cursor", "remove_orphans", "replay_size", "run_curate", "sample_replay", "scan_feedback", "select",
    "shingles", "short_hash", "snapshot_paths", "validate_config", "write_snapshot",
]
