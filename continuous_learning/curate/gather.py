"""Stage 1, gather: pass 2 over the log. Take the new interactions (and older ones with new feedback), join their
feedback, `select` each and spool the examples into the pool."""
from __future__ import annotations

import itertools
from array import array
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..core.records import INTERACTION, Interaction
from ..storage.crypto import cipher_from_env, may_hold_sealed, open_messages
from ..storage.store import iter_jsonl_lines
from .cursor import Cursor, Watermark, moment_of
from .examples import Example
from .feedback import FeedbackScan
from .pool import give_back_freed_memory
from .progress import Progress, ticker
from .selection import Rules, merge_feedback, select
from .state import CurateContext, Pool
from .text import clean_messages


def gather(pool: Pool, ctx: CurateContext) -> Pool:
    """Select the new material into `pool.examples`; the tally and watermark of pass 2 ride along."""
    state = _Pass2(ctx.scan, ctx.cursor, ctx.already, ctx.rules, ctx.full)
    for example in _selected(ctx.settings.raw_log, state, ctx.progress):
        pool.examples.add(example)
    pool.examples.finish()
    state.tally["orphan_feedback"] = state.orphans()
    ctx.scan.release()  # its per-interaction tables have no reader after pass 2; its counts stay
    give_back_freed_memory()
    return replace(pool, tally=state.tally, watermark=state.watermark)


def _selected(path: Path, state: _Pass2, progress: Progress | None) -> Iterator[Example]:
    """The examples of the log's interactions, up to the line pass 1 stopped at."""
    scan = state.scan
    tick = ticker(progress, "selecting turns", scan.lines)
    cipher = cipher_from_env()
    for number, raw, record in iter_jsonl_lines(path):
        if number > scan.lines:  # appended after pass 1: its feedback was not collected, leave it to the next run
            break
        tick(number)
        if isinstance(record, dict) and record.get("type") == INTERACTION:
            if may_hold_sealed(raw):
                record = open_messages(record, cipher)
            example = state.consider(record)
            if example is not None:
                yield example
    tick(scan.lines, True)


@dataclass
class _Pass2:
    """Decides, record by record, whether an interaction is new material and what it yields."""

    scan: FeedbackScan
    cursor: Cursor
    already_snapshotted: set[str]
    rules: Rules
    full: bool
    tally: Counter = field(default_factory=Counter)
    watermark: Watermark = field(default_factory=Watermark)  # the newest interaction seen

    def __post_init__(self) -> None:
        self.rated_seen = array("q")  # hash() of each rated id seen: orphans are the rest (8 bytes each, not a set)
        self.deferred = set(self.cursor.deferred_ids)

    def orphans(self) -> int:
        """Feedback targets never seen as an interaction (looked up a slice at a time in the sorted seen hashes)."""
        import numpy as np

        seen = np.sort(np.frombuffer(self.rated_seen, dtype=np.int64))
        targets, missing = iter(self.scan.feedback), 0
        while len(piece := np.fromiter((hash(k) for k in itertools.islice(targets, 1 << 16)), dtype=np.int64)):
            if len(seen) == 0:
                missing += len(piece)
                continue
            at = np.minimum(np.searchsorted(seen, piece), len(seen) - 1)
            missing += int((seen[at] != piece).sum())
        return missing

    def consider(self, record: dict) -> Example | None:
        tally = self.tally
        tally["interactions"] += 1
        ident, stamp = record.get("id"), record.get("recorded_at") or record.get("created_at")
        moment = moment_of(stamp)
        if not isinstance(ident, str) or moment is None:
            tally["bad_records"] += 1
            return None
        if ident in self.scan.feedback:
            self.rated_seen.append(hash(ident))
        self.watermark.see(moment, stamp, ident)
        if self.full or self.cursor.new_interaction(moment, ident):
            tally["new_interactions"] += 1
        elif ident in self.deferred:
            tally["deferred"] += 1
        elif ident not in self.scan.late:
            return None
        elif ident in self.already_snapshotted:
            tally["late_feedback_already_in_snapshot"] += 1
            return None
        else:
            tally["late_feedback"] += 1
        return self.select_joined(record)

    def select_joined(self, record: dict) -> Example | None:
        reason = _plain_unrated_reason(record, self.scan.feedback, self.rules)
        if reason is not None:
            self.tally[f"dropped.{reason}"] += 1
            return None
        try:
            interaction = Interaction.from_dict(record)
            if interaction.id in self.scan.feedback:
                interaction.feedback = merge_feedback(interaction.feedback, self.scan.feedback[interaction.id])
            outcome = select(interaction, self.rules)
        except (TypeError, ValueError, KeyError, AttributeError):  # a record edited into nonsense is dropped, not fatal
            outcome = "malformed"
        if isinstance(outcome, str):
            self.tally[f"dropped.{outcome}"] += 1
            return None
        self.tally[f"selected.{outcome.kind}"] += 1
        raters = self.scan.table.raters(interaction.id)
        if raters:  # a correction is the rater's own text: deleting their data must find it
            outcome.user_hashes = sorted(set(outcome.user_hashes) | raters)
        return outcome


def _plain_unrated_reason(record: dict, rated: dict, rules: Rules) -> str | None:
    """The drop reason `select` would give a turn nobody rated, read off the raw record without building an
    Interaction (most turns are unrated; this is the hot path). None when the turn needs the full path: it
    has feedback, unrated turns are wanted, retention applies, or its messages are malformed."""
    if rules.include_unrated or rules.expires_before is not None or record.get("feedback") or record["id"] in rated:
        return None
    if "session_id" not in record or clean_messages(record.get("messages")) is None:
        return None  # malformed in some way: the full path decides how
    flagged = record.get("pii_flagged")
    if flagged is not None and not isinstance(flagged, bool):
        return None  # a wrongly typed flag: the record parser decides
    return "pii_flagged" if flagged else "unrated"
