"""Pass 1 over the log: every feedback event merged per interaction (`scan_feedback`), held compactly enough for a
big log (`FeedbackTable`)."""
from __future__ import annotations

import sys
from array import array
from collections.abc import Iterator, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.records import FEEDBACK, Feedback
from ..storage.crypto import cipher_from_env, may_hold_sealed, open_messages
from ..storage.store import ReadReport, iter_jsonl_lines
from .cursor import Cursor, Watermark, moment_of
from .progress import Progress, ticker
from .selection import merge_feedback


@dataclass
class FeedbackScan:
    """Pass 1: every feedback event merged per interaction, in log order."""

    table: FeedbackTable = field(default_factory=lambda: FeedbackTable())
    late: set[str] = field(default_factory=set)  # interactions with an event newer than the cursor
    events: int = 0
    bad_records: int = 0
    lines: int = 0  # pass 2 stops here, so lines appended meanwhile are left for the next run
    watermark: Watermark = field(default_factory=Watermark)
    report: ReadReport = field(default_factory=ReadReport)

    def __post_init__(self) -> None:
        self.feedback: Mapping[str, Feedback] = self.table  # target -> merged Feedback, read-only

    def release(self) -> None:
        """Drop the per-interaction tables once pass 2 (their only reader) is done; the counts stay."""
        self.table, self.late = FeedbackTable(), set()
        self.feedback = self.table


class FeedbackTable(Mapping):
    """target -> (merged Feedback, raters), built from events in log order.

    While the log is read, each event of a UUID target is appended as 24 bytes (its 16-byte id, a code for its
    verdict, a code for its rater); `freeze` sorts them by id (stable, so log order holds within a target) and
    merges each target's events. Lookups then bisect the sorted ids: a dict of a big log's targets took ~4x the
    memory. Most lookups miss (most turns are unrated), so a bit per hash(target) slot answers those without the
    bisect. Targets that are not canonical UUIDs (rare) keep a plain dict."""

    def __init__(self) -> None:
        self._pending_ids, self._pending_values, self._pending_raters = bytearray(), array("I"), array("I")
        self._pending_hashes = array("q")
        self._values: list[Feedback] = []  # code -> Feedback
        self._value_codes: dict[int, int] = {}  # id() of a shared Feedback -> its code
        self._raters: list[Any] = [None]  # code -> None, one rater, or a frozenset of raters
        self._rater_codes: dict[Any, int] = {None: 0}
        self._other: dict[Any, tuple[Feedback, Any]] = {}
        self._keys = self._key_values = self._key_raters = None
        self._hash_bits, self._hash_mask = b"", 0
        self._last: tuple[Any, int] = (None, -1)

    # --- building ---
    def add(self, target: str, event: Feedback, user: str | None) -> None:
        key = _packed_id(target)
        if not isinstance(key, bytes):
            earlier = self._other.get(key)
            feedback = _shared(event if earlier is None else merge_feedback(earlier[0], event))
            rater = None if earlier is None else earlier[1]
            self._other[key] = (feedback, rater if user is None else _with_rater(rater, user))
            return
        self._thaw()
        self._pending_ids += key
        self._pending_hashes.append(hash(target))
        self._pending_values.append(self._value_code(_shared(event)))
        self._pending_raters.append(self._rater_code(user))

    def _value_code(self, feedback: Feedback) -> int:
        if id(feedback) in _SHARED_IDS:
            code = self._value_codes.get(id(feedback))
            if code is None:
                code = self._value_codes[id(feedback)] = len(self._values)
                self._values.append(feedback)
            return code
        self._values.append(feedback)
        return len(self._values) - 1

    def _rater_code(self, rater: Any) -> int:
        code = self._rater_codes.get(rater)
        if code is None:
            code = self._rater_codes[rater] = len(self._raters)
            self._raters.append(rater)
        return code

    def _thaw(self) -> None:
        """Events after a freeze: put the frozen targets back in front of the pending ones (merged stays merged)."""
        if self._keys is None:
            return
        keys, values, raters = self._keys, self._key_values, self._key_raters
        self._keys = self._key_values = self._key_raters = None
        self._last = (None, -1)
        self._pending_ids = bytearray(keys.tobytes()) + self._pending_ids
        self._pending_values = array("I", values.tobytes()) + self._pending_values
        self._pending_raters = array("I", raters.tobytes()) + self._pending_raters
        packed = keys.tobytes()
        frozen = (hash(_unpacked_id(packed[at:at + 16])) for at in range(0, len(packed), 16))
        self._pending_hashes = array("q", frozen) + self._pending_hashes

    def freeze(self) -> None:
        import numpy as np

        if self._keys is not None:
            return
        ids = np.frombuffer(self._pending_ids, dtype="S16")  # ordering of S16 is bytewise; all are 16 bytes long
        order = np.argsort(ids, kind="stable")
        keys = ids[order]
        del ids
        self._pending_ids = bytearray()
        values = np.frombuffer(self._pending_values, dtype=np.uint32)[order]
        raters = np.frombuffer(self._pending_raters, dtype=np.uint32)[order]
        self._pending_values, self._pending_raters = array("I"), array("I")
        del order
        self._hash_bits, self._hash_mask = _hash_bits(np.frombuffer(self._pending_hashes, dtype=np.int64))
        self._pending_hashes = array("q")
        first = np.ones(len(keys), dtype=bool)
        first[1:] = keys[1:] != keys[:-1]
        starts = np.flatnonzero(first)
        ends = np.append(starts[1:], len(keys))
        for group in np.flatnonzero(ends - starts > 1):  # targets rated more than once: merge in log order
            start, end = int(starts[group]), int(ends[group])
            values[start], raters[start] = self._merged(values[start:end], raters[start:end])
        self._keys, self._key_values, self._key_raters = keys[starts], values[starts], raters[starts]

    def _merged(self, values: Any, raters: Any) -> tuple[int, int]:
        feedback, rater = self._values[int(values[0])], self._raters[int(raters[0])]
        for value in values[1:]:
            feedback = _shared(merge_feedback(feedback, self._values[int(value)]))
        for code in raters[1:]:
            if code:
                rater = _with_rater(rater, self._raters[int(code)])
        return self._value_code(feedback), self._rater_code(rater)

    # --- reading ---
    def _row(self, target: Any) -> int:
        """Row of `target` in the frozen table, -1 if absent (the last answer is kept: pass 2 asks several times)."""
        last = self._last
        if last[0] == target and type(last[0]) is type(target):
            return last[1]
        if self._keys is None:
            self.freeze()
        row = -1
        if type(target) is str:
            slot = hash(target) & self._hash_mask
            if (self._hash_bits[slot >> 3] >> (slot & 7)) & 1:
                key = _packed_id(target)
                if isinstance(key, bytes):
                    at = int(self._keys.searchsorted(key))
                    if at < len(self._keys) and self._keys[at] == key.rstrip(b"\0"):  # S16 items drop trailing zeros
                        row = at
        self._last = (target, row)
        return row

    def _pair(self, target: Any) -> tuple[Feedback, Any] | None:
        row = self._row(target)
        if row >= 0:
            return self._values[int(self._key_values[row])], self._raters[int(self._key_raters[row])]
        if self._other and type(target) is str:  # its keys are the targets that are not canonical UUIDs, as they are
            return self._other.get(target)
        return None

    def __getitem__(self, target: str) -> Feedback:
        pair = self._pair(target)
        if pair is None:
            raise KeyError(target)
        return pair[0]

    def __contains__(self, target: object) -> bool:
        return self._row(target) >= 0 or bool(self._other) and type(target) is str and target in self._other

    def __iter__(self) -> Iterator[str]:
        self.freeze()
        packed = self._keys.tobytes()
        yield from (_unpacked_id(packed[at:at + 16]) for at in range(0, len(packed), 16))
        yield from map(_unpacked_id, self._other)

    def __len__(self) -> int:
        self.freeze()
        return len(self._keys) + len(self._other)

    def raters(self, target: str) -> set[str]:
        known = (self._pair(target) or (None, None))[1]
        return set() if known is None else {known} if isinstance(known, str) else set(known)


def _hash_bits(hashes: Any) -> tuple[bytes, int]:
    """A bitmap with a bit set for each hash (modulo a power of two, ~16 slots per hash: ~4% false positives)."""
    import numpy as np

    size = 1 << max(16, (16 * len(hashes)).bit_length())
    bits = np.zeros(size, dtype=bool)
    bits[hashes & (size - 1)] = True
    return np.packbits(bits, bitorder="little").tobytes(), size - 1


def _packed_id(ident: Any) -> Any:
    """A canonical (lowercase) UUID string as its 16 bytes, anything else as it is: the feedback table of a big
    log holds hundreds of thousands of ids, and 16 bytes take half the memory of the 36-character text."""
    if isinstance(ident, str) and len(ident) == 36 and ident[8] == ident[13] == ident[18] == ident[23] == "-" \
            and ident.lower() == ident:
        try:
            return bytes.fromhex(ident.replace("-", ""))
        except ValueError:
            pass
    return ident


def _unpacked_id(key: Any) -> Any:
    if isinstance(key, bytes):
        text = key.hex()
        return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"
    return key


class _KeysOf(AbstractSet):
    """The keys of a mapping as a read-only set, without a copy."""

    def __init__(self, mapping: Mapping):
        self._mapping = mapping

    def __contains__(self, key: object) -> bool:
        return key in self._mapping

    def __iter__(self) -> Iterator:
        return iter(self._mapping)

    def __len__(self) -> int:
        return len(self._mapping)


def scan_feedback(path: Path, cursor: Cursor, progress: Progress | None = None,
                  total: int | None = None) -> FeedbackScan:
    """Pass 1: read every feedback event of the log into a frozen `FeedbackScan`."""
    scan = FeedbackScan()
    if cursor._edges[2] is None:  # no feedback seen before: every event is late, so `late` is every target
        scan.late = _KeysOf(scan.table)
    tick = ticker(progress, "reading feedback", total)
    cipher = cipher_from_env()
    for number, raw, record in iter_jsonl_lines(path, scan.report):
        scan.lines = number
        tick(number)
        if isinstance(record, dict) and record.get("type") == FEEDBACK:
            _add_event(scan, open_messages(record, cipher) if may_hold_sealed(raw) else record, cursor)
    scan.lines = max(scan.lines, scan.report.bad_lines[-1][0] if scan.report.bad_lines else 0)
    scan.table.freeze()
    tick(scan.lines, True)
    return scan


def _add_event(scan: FeedbackScan, record: dict, cursor: Cursor) -> None:
    target, moment = record.get("interaction_id"), moment_of(record.get("created_at"))
    if not isinstance(target, str) or moment is None or not isinstance(record.get("feedback"), dict):
        scan.bad_records += 1
        return
    try:
        event = Feedback.from_dict(record["feedback"])
    except TypeError:
        scan.bad_records += 1
        return
    scan.events += 1
    scan.table.add(target, event, sys.intern(str(record["user_hash"])) if record.get("user_hash") else None)
    ident = str(record.get("id") or "")
    scan.watermark.see(moment, record["created_at"], ident)
    if not isinstance(scan.late, _KeysOf) and cursor.new_feedback(moment, ident):
        scan.late.add(target)


_SHARED_FEEDBACK: dict[tuple, Feedback] = {}
_SHARED_IDS: set[int] = set()  # ids of the objects above (they live as long as the module)


def _verdict_key(feedback: Feedback) -> tuple:
    return tuple((type(v), v) for v in (feedback.score, feedback.helpful, feedback.private))


def _shared(feedback: Feedback) -> Feedback:
    """One object per distinct plain verdict (score / helpful / private, no text): a big log has hundreds of
    thousands of ratings but only a handful of distinct ones. Feedback with text, or odd values, stays its own."""
    if feedback.comment is not None or feedback.correction is not None:
        return feedback
    try:
        shared = _SHARED_FEEDBACK.get(_verdict_key(feedback))
    except TypeError:  # an unhashable value (a list where a score belongs): keep it as it is
        return feedback
    if shared is None and len(_SHARED_FEEDBACK) < 4096:
        shared = _SHARED_FEEDBACK[_verdict_key(feedback)] = feedback
        _SHARED_IDS.add(id(feedback))
    return feedback if shared is None else shared


def _with_rater(known: str | frozenset | None, user: str) -> str | frozenset:
    """Most turns have one rater: keep it as a bare string, a set only for a second one (memory on big logs)."""
    if known is None or known == user:
        return user
    return frozenset({known, user}) if isinstance(known, str) else known | {user}
