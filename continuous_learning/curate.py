"""Curate: from the raw interaction log to versioned ChatML training snapshots.

Pure functions do the work: `select` (an example or the reason a turn is dropped), `dedupe_exact`,
`dedupe_near` (MinHash + LSH proposes, exact shingle Jaccard decides, the best-rated survives), `cap_domains`,
`split_eval` (whole prompt clusters go to one side, so no prompt is in both) and `sample_replay`.
`run_curate` streams the log through them twice (feedback events first, then interactions), writes
`data/curated/curated_<ts>.jsonl`, its `_eval.jsonl` and `_manifest.json` atomically and records the snapshot
in the registry. Nothing new to curate: it writes nothing and says why.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import heapq
import itertools
import math
import os
import re
import sys
import unicodedata
from array import array
from collections import Counter
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import orjson

from . import registry
from .train import preference
from .storage.crypto import cipher_from_env, open_messages, seal_messages
from .core.errors import ConfigError
from .core.records import (FEEDBACK, INTERACTION, ROLES, SCHEMA_VERSION, Feedback, Interaction, helpful_verdict,
    parse_time)
from .core.settings import CurateConfig, Settings
from .storage.store import (FILE_MODE, ReadReport, atomic_write_json, atomic_write_lines, dumps_line, ensure_dir,
    fsync_dir, iter_jsonl, remove_stale_temp_files, temp_file, workspace_lock)

KIND_WEIGHTS = {"corrected": 2.0, "helpful": 1.0, "unrated": 0.5, "unhelpful": 1.0}
KIND_RANK = {"corrected": 3, "helpful": 2, "unrated": 1, "replay": 0, "unhelpful": -1}
KINDS = ("corrected", "helpful", "unrated", "replay", "unhelpful")
DROP_REASONS = (
    "expired", "private", "pii_flagged", "malformed", "unhelpful", "neutral", "unrated",
    "empty", "truncated", "too_short", "too_long", "blocklisted",
)
SHINGLE_CHARS = 5
NUM_PERM = 64
ID_CHARS = 16
# Records are stamped before they are appended, so two writers can land slightly out of order, and a batch
# import stamps many records with the same millisecond. The cursor remembers the ids seen in this window.
CURSOR_SLACK = timedelta(seconds=5)
PROGRESS_EVERY = 4096

Progress = Callable[[str, int, Optional[int]], None]


# --- text -------------------------------------------------------------------------------------------
_SPACES = re.compile(r"\s+")


def normalise(text: str) -> str:
    """Unicode NFKC, case-folded, whitespace collapsed: the form duplicates are compared in."""
    return _SPACES.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def short_hash(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()[:ID_CHARS]


def shingles(text: str, size: int = SHINGLE_CHARS) -> set[str]:
    return {text[i : i + size] for i in range(max(1, len(text) - size + 1))}


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


_ROLE_NAMES = {role: role for role in ROLES}  # one shared string per role, not one per parsed message


def clean_messages(messages: Any) -> list[dict] | None:
    """[{"role", "content"}] ending with the assistant answer, or None when the shape is wrong."""
    if not isinstance(messages, list) or not messages:
        return None
    out = []
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in ROLES or not isinstance(message.get("content"), str):
            return None
        role, content = _ROLE_NAMES[message["role"]], message["content"]
        out.append({"role": role, "content": sys.intern(content) if role == "system" else content})
    return out if out[-1]["role"] == "assistant" else None


# --- examples ---------------------------------------------------------------------------------------
@dataclass
class Example:
    """One training example: a conversation whose final assistant message is the target."""

    messages: list[dict]
    kind: str
    weight: float
    source_ids: list[str]
    user_hashes: list[str]
    target_tool: str | None = None
    created_at: str = ""
    rank: tuple = ()  # larger = better rated; decides which duplicate survives (not written)
    rejected: str | None = None  # a correction's pair: the model's answer the user replaced

    @property
    def desirable(self) -> bool:
        return self.kind != "unhelpful"

    @cached_property
    def id(self) -> str:
        """Short sha256 of the normalised prompt (the dialogue before the target) and the answer."""
        return short_hash(*(f"{m['role']}:{normalise(m['content'])}" for m in self.messages if m["role"] != "system"))

    @property
    def prompt(self) -> str:
        return next((m["content"] for m in reversed(self.messages) if m["role"] == "user"), "")

    @cached_property
    def prompt_key(self) -> str:
        return normalise(self.prompt)

    @property
    def text(self) -> str:
        return "\n".join(normalise(m["content"]) for m in self.messages if m["role"] != "system")

    def absorb(self, other: "Example") -> "Example":
        """The better-rated of two duplicates, carrying the sources and users of both."""
        keep, drop = (self, other) if self.rank >= other.rank else (other, self)
        keep.source_ids = list(dict.fromkeys(keep.source_ids + drop.source_ids))
        keep.user_hashes = sorted(set(keep.user_hashes) | set(drop.user_hashes))
        return keep

    def to_record(self) -> dict:
        return {
            "messages": [{"role": m["role"], "content": m["content"]} for m in self.messages],
            "id": self.id,
            "source_ids": list(self.source_ids),
            "weight": float(self.weight),
            "kind": self.kind,
            "target_tool": self.target_tool,
            "user_hashes": list(self.user_hashes),
            "created_at": self.created_at,
            **preference.trl_fields(self.messages, self.desirable, self.rejected),
        }

    @classmethod
    def from_record(cls, record: Any, kind: str | None = None) -> "Example | None":
        """A snapshot line back as an Example (None when it is not one)."""
        messages = clean_messages(record.get("messages")) if isinstance(record, dict) else None
        if messages is None:
            return None
        try:
            weight = float(record.get("weight", 1.0))
        except (TypeError, ValueError):
            weight = 1.0
        return cls(
            messages=messages,
            kind=kind or str(record.get("kind", "helpful")),
            weight=weight,
            source_ids=[str(s) for s in record.get("source_ids") or []],
            user_hashes=sorted({str(h) for h in record.get("user_hashes") or []}),
            target_tool=record.get("target_tool"),
            created_at=str(record.get("created_at") or ""),
            rank=(0, 0, ""),
            rejected=preference.rejected_text(record) if kind is None else None,
        )


def _seal(record: dict, cipher) -> dict:
    return preference.seal_fields(seal_messages(record, cipher), cipher)


def _open(record: dict, cipher) -> dict:
    return preference.open_fields(open_messages(record, cipher), cipher)


# --- selection --------------------------------------------------------------------------------------
def _check(ok: bool, name: str, value: Any, rule: str) -> None:
    if not ok:
        raise ConfigError(f"curate.{name} must be {rule}, got {value!r}", "fix it in cl.toml, the environment or the flag")


def validate_config(config: CurateConfig) -> None:
    """Reject knob values that would make curation meaningless before any work starts."""
    _check(config.unhelpful_threshold < config.helpful_threshold, "unhelpful_threshold", config.unhelpful_threshold,
           f"below curate.helpful_threshold ({config.helpful_threshold})")
    _check(0 <= config.min_chars <= config.max_chars, "min_chars", config.min_chars, f"between 0 and max_chars ({config.max_chars})")
    _check(0 < config.near_dup_threshold <= 1, "near_dup_threshold", config.near_dup_threshold, "in (0, 1]")
    _check(0 < config.domain_cap <= 1, "domain_cap", config.domain_cap, "in (0, 1]")
    _check(0 <= config.eval_fraction < 1, "eval_fraction", config.eval_fraction, "in [0, 1)")
    _check(config.replay_fraction >= 0, "replay_fraction", config.replay_fraction, ">= 0")
    _check(config.retention_days >= 0, "retention_days", config.retention_days, ">= 0")
    _check(all(isinstance(w, str) and w.strip() for w in config.blocklist), "blocklist", config.blocklist, "a list of non-empty strings")


def blocklist_pattern(phrases: Iterable[str]) -> re.Pattern | None:
    """Whole words/phrases, case-insensitive: 'ass' must not drop a turn about a 'class'."""
    alternatives = [re.escape(normalise(p)) for p in phrases if p.strip()]
    return re.compile(r"(?<!\w)(?:" + "|".join(alternatives) + r")(?!\w)") if alternatives else None


@dataclass(frozen=True)
class Rules:
    """Everything `select` needs, resolved once per run."""

    helpful_threshold: int = 4
    unhelpful_threshold: int = 2
    include_unrated: bool = False
    min_chars: int = 2
    max_chars: int = 8000
    blocklist: re.Pattern | None = None
    expires_before: datetime | None = None

    @classmethod
    def from_config(cls, config: CurateConfig, include_unrated: bool | None = None, now: datetime | None = None) -> "Rules":
        validate_config(config)
        now = now or datetime.now(timezone.utc)
        return cls(
            helpful_threshold=config.helpful_threshold,
            unhelpful_threshold=config.unhelpful_threshold,
            include_unrated=config.include_unrated if include_unrated is None else include_unrated,
            min_chars=config.min_chars,
            max_chars=config.max_chars,
            blocklist=blocklist_pattern(config.blocklist),
            expires_before=now - timedelta(days=config.retention_days) if config.retention_days > 0 else None,
        )


_FEEDBACK_FIELDS = tuple(f.name for f in dataclasses.fields(Feedback))


def merge_feedback(earlier: Feedback, later: Feedback) -> Feedback:
    """`earlier.merged(later)` without its per-call dataclass-to-dict copies (the curate hot path)."""
    return Feedback(**{k: getattr(later, k) if getattr(later, k) is not None else getattr(earlier, k) for k in _FEEDBACK_FIELDS})


def _rating(feedback: Feedback) -> float:
    if isinstance(feedback.score, (int, float)):
        return float(feedback.score)
    return {True: 4.0, False: 1.0}.get(feedback.helpful, 0.0)


def content_problem(messages: list[dict], truncated: bool, rules: Rules) -> str | None:
    """Why these messages can't be a training example (None when they can)."""
    prompt = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "").strip()
    answer = messages[-1]["content"].strip()
    if not prompt or not answer:
        return "empty"
    if truncated:
        return "truncated"
    if min(len(prompt), len(answer)) < rules.min_chars:
        return "too_short"
    if any(len(m["content"]) > rules.max_chars for m in messages if m["role"] != "system"):
        return "too_long"
    if rules.blocklist and any(rules.blocklist.search(normalise(m["content"])) for m in messages):
        return "blocklisted"
    return None


def select(interaction: Interaction, rules: Rules) -> Example | str:
    """The example a turn (with its feedback already joined) yields, or the reason it is dropped.

    Checks run in this order and the first that applies is the reason: expired, private, pii_flagged,
    malformed, unhelpful/neutral/unrated, empty, truncated, too_short, too_long, blocklisted.
    """
    feedback = interaction.feedback
    if rules.expires_before and parse_time(interaction.created_at) < rules.expires_before:
        return "expired"
    if feedback.private:
        return "private"
    if interaction.pii_flagged:
        return "pii_flagged"
    messages = clean_messages(interaction.messages)
    if messages is None or (feedback.correction is not None and not isinstance(feedback.correction, str)):
        return "malformed"
    kind = helpful_verdict(feedback, rules.helpful_threshold, rules.unhelpful_threshold)
    if kind == "neutral" or (kind == "unrated" and not rules.include_unrated):
        return kind
    rejected = None
    if kind == "corrected":  # the user's answer replaces the model's, so a truncated answer no longer matters
        rejected = _pair_rejected(messages[-1]["content"], feedback.correction, interaction.truncated, rules)
        messages[-1] = {"role": "assistant", "content": feedback.correction}
    # an unhelpful answer is what the model said, cut short or not: it is an example of what not to say
    problem = content_problem(messages, interaction.truncated and kind == "helpful", rules)
    if problem:
        return problem
    return Example(
        messages=messages,
        kind=kind,
        weight=KIND_WEIGHTS[kind],
        source_ids=[str(interaction.id)],
        user_hashes=[sys.intern(str(interaction.user_hash))] if interaction.user_hash else [],
        target_tool=interaction.target_tool if isinstance(interaction.target_tool, str) and interaction.target_tool else None,
        created_at=str(interaction.created_at),
        rank=(KIND_RANK[kind], _rating(feedback), str(interaction.recorded_at)),
        rejected=rejected,
    )


def _pair_rejected(answer: str, correction: str, truncated: bool, rules: Rules) -> str | None:
    """The model's answer as the rejected side of a correction's pair, when it is a usable one."""
    if truncated or not answer.strip() or normalise(answer) == normalise(correction) or len(answer) > rules.max_chars:
        return None
    if rules.blocklist and rules.blocklist.search(normalise(answer)):
        return None
    return answer


# --- dedupe -----------------------------------------------------------------------------------------
def dedupe_exact(examples: Iterable[Example]) -> tuple[list[Example], int]:
    """Collapse examples with the same normalised text (same id). Returns (survivors, number collapsed)."""
    best: dict[str, Example] = {}
    collapsed = 0
    for example in examples:
        kept = best.get(example.id)
        if kept is None:
            best[example.id] = example
        else:
            best[example.id] = kept.absorb(example)
            collapsed += 1
    return list(best.values()), collapsed


_SIGNATURE_CELLS = 1 << 21  # permutations x shingle positions hashed at once (bounds the temporary arrays)


@lru_cache(maxsize=1)
def _permutations() -> tuple[Any, Any]:
    """Fixed multiply-shift hash parameters (odd multipliers), so signatures are the same in every run."""
    import numpy as np

    rng = np.random.default_rng(20261123)
    a = rng.integers(1, 2**63, NUM_PERM, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    return a, rng.integers(0, 2**63, NUM_PERM, dtype=np.uint64)


_PAD = "\U0010ffff"  # a noncharacter: pads a text shorter than a shingle, which is then one shingle, itself


def _signatures(texts: list[str]) -> Iterator[Any]:
    """MinHash signature (NUM_PERM uint32 minima) of each text's character shingles, numpy-vectorised over
    chunks of texts; identical texts get identical signatures, repeated shingles count once (a min ignores them)."""
    import numpy as np

    a, b = _permutations()
    per_chunk = _SIGNATURE_CELLS // NUM_PERM
    start = 0
    while start < len(texts):
        chunk, size = [], 0
        while start < len(texts) and (not chunk or size < per_chunk):
            text = texts[start]
            chunk.append(text if len(text) >= SHINGLE_CHARS else text + _PAD * (SHINGLE_CHARS - len(text)))
            size += len(chunk[-1])
            start += 1
        hashes, offsets = _window_hashes(chunk)
        with np.errstate(over="ignore"):
            cells = np.multiply.outer(a, hashes)
            cells += b[:, None]
        cells >>= np.uint64(32)
        yield from np.minimum.reduceat(cells, offsets, axis=1).T.astype(np.uint32)


def _window_hashes(texts: list[str]) -> tuple[Any, Any]:
    """A 64-bit hash of every SHINGLE_CHARS-long window inside each text (a polynomial over code points, then a
    mixer), all texts at once; and where each text's windows start in the result."""
    import numpy as np

    points = np.frombuffer("".join(texts).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    lengths = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
    count = len(points) - SHINGLE_CHARS + 1
    with np.errstate(over="ignore"):
        h = np.zeros(count, dtype=np.uint64)
        for k in range(SHINGLE_CHARS):
            h = h * np.uint64(0x100000001B3) + points[k : k + count]
        h ^= h >> np.uint64(29)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(32)
    keep = np.ones(count, dtype=bool)
    ends = np.cumsum(lengths)
    crossing = (ends[:, None] - np.arange(1, SHINGLE_CHARS)).ravel()  # windows running into the next text
    keep[crossing[crossing < count]] = False
    windows = lengths - SHINGLE_CHARS + 1
    return h[keep], np.concatenate([[0], np.cumsum(windows)[:-1]])


def _band_shape(threshold: float) -> tuple[int, int]:
    """(bands, rows) of LSH over NUM_PERM values whose candidate curve 1-(1-J^r)^b best separates pairs above and
    below `threshold` (equal weight on missed pairs above and needless candidates below)."""

    def area(f, lo: float, hi: float, steps: int = 200) -> float:
        width = (hi - lo) / steps
        return sum(f(lo + (i + 0.5) * width) for i in range(steps)) * width

    best, shape = float("inf"), (NUM_PERM, 1)
    for bands in range(1, NUM_PERM + 1):
        for rows in range(1, NUM_PERM // bands + 1):
            def hit(j: float) -> float:
                return 1 - (1 - j**rows) ** bands

            error = area(hit, 0.0, threshold) + area(lambda j: 1 - hit(j), threshold, 1.0)
            if error < best:
                best, shape = error, (bands, rows)
    return shape


@lru_cache(maxsize=8)
def _cached_band_shape(threshold: float) -> tuple[int, int]:
    return _band_shape(threshold)


class NearIndex:
    """Near-duplicate lookup: MinHash LSH (banded signatures) proposes candidates, exact shingle Jaccard decides.

    The LSH band threshold sits below the real one so that pairs just above it are not missed.
    """

    def __init__(self, threshold: float):
        self.threshold = threshold
        self._bands, self._rows = _cached_band_shape(round(max(0.1, threshold - 0.2), 4))
        self._tables: list[dict[int, int | list[int]]] = [{} for _ in range(self._bands)]
        self._texts: dict[int, str] = {}

    def band_keys(self, texts: list[str]) -> Any:
        """(texts x bands) uint64: each text's MinHash signature cut into bands, each band hashed to one integer."""
        import numpy as np

        weights = np.array([0x9E3779B97F4A7C15 * (2 * i + 1) % 2**64 for i in range(self._rows)], dtype=np.uint64)
        width = self._bands * self._rows
        out = np.empty((len(texts), self._bands), dtype=np.uint64)
        for start in range(0, len(texts), 4096):
            chunk = np.stack(list(_signatures(texts[start : start + 4096])))[:, :width].astype(np.uint64)
            with np.errstate(over="ignore"):
                out[start : start + len(chunk)] = (chunk.reshape(len(chunk), self._bands, self._rows) * weights).sum(
                    axis=2, dtype=np.uint64)
        return out

    def signatures(self, texts: list[str]) -> Iterator[list[int]]:
        """Each text's band keys as a list (what `add`, `candidates` and `matches` take)."""
        yield from self.band_keys(texts).tolist()

    def earlier_candidates(self, texts: list[str]) -> dict[int, list[int]]:
        """For each text, the earlier texts sharing an LSH band with it (ascending), found by sorting each band's
        keys: what probing an index holding every earlier text would propose, without holding that index."""
        return _earlier_from_keys(self.band_keys(texts))

    def add(self, key: int, text: str, signature: list[int]) -> None:
        for table, band in zip(self._tables, signature):
            hits = table.get(band)  # most bands hold one key: store it bare, a list only on a collision
            if hits is None:
                table[band] = key
            elif isinstance(hits, int):
                table[band] = [hits, key]
            else:
                hits.append(key)
        self._texts[key] = text

    def candidates(self, signature: list[int]) -> set[int]:
        found: set[int] = set()
        for table, band in zip(self._tables, signature):
            hits = table.get(band)
            if hits is None:
                continue
            if isinstance(hits, int):
                found.add(hits)
            else:
                found.update(hits)
        return found

    def matches(self, text: str, signature: Any) -> list[int]:
        candidates = self.candidates(signature)
        if not candidates:
            return []
        mine = shingles(text)
        return sorted(k for k in candidates if jaccard(mine, shingles(self._texts[k])) >= self.threshold)

    @classmethod
    def of(cls, texts: list[str], threshold: float) -> "NearIndex":
        index = cls(threshold)
        for i, (text, signature) in enumerate(zip(texts, index.signatures(texts))):
            index.add(i, text, signature)
        return index

    def matches_any(self, texts: list[str]) -> list[bool]:
        return [bool(self.matches(t, s)) for t, s in zip(texts, self.signatures(texts))] if self._texts else [False] * len(texts)


def dedupe_near(examples: list[Example], threshold: float) -> tuple[list[Example], int]:
    """Collapse near duplicates (shingle Jaccard >= threshold) into the best-rated of each cluster."""
    if threshold >= 1 or len(examples) < 2:
        return list(examples), 0
    ordered = sorted(examples, key=lambda e: e.rank, reverse=True)  # best first, so the first of a cluster survives
    texts = [e.text for e in ordered]
    candidates = NearIndex(threshold).earlier_candidates(texts)
    kept: dict[int, Example] = {}
    for i, example in enumerate(ordered):
        match = _first_near(texts, i, [j for j in candidates.get(i, ()) if j in kept], threshold)
        if match is None:
            kept[i] = example
        else:
            kept[match] = kept[match].absorb(example)
    return list(kept.values()), len(examples) - len(kept)


def _first_near(texts: list[str], i: int, candidates: list[int], threshold: float) -> int | None:
    """The first candidate whose shingle Jaccard with text i reaches the threshold."""
    if not candidates:
        return None
    mine = shingles(texts[i])
    return next((j for j in candidates if jaccard(mine, shingles(texts[j])) >= threshold), None)


# --- diversity and split ------------------------------------------------------------------------------
def cap_domains(examples: list[Example], cap: float) -> tuple[list[Example], list[Example]]:
    """(kept, capped): no `target_tool` keeps more than floor(cap x all examples), best-rated first.

    Turns without a target_tool are not a domain and are never capped; with a single domain there is
    nothing to balance against (untagged turns are not a rival domain), so nothing is capped. The cap balances
    what is imitated: undesirable ("no") examples neither count nor are capped.
    """
    domains = Counter(e.target_tool for e in examples if e.target_tool and e.desirable)
    if cap >= 1 or len(domains) < 2:
        return list(examples), []
    limit = max(1, math.floor(cap * sum(1 for e in examples if e.desirable)))
    capped: list[Example] = []
    for domain in sorted(d for d, n in domains.items() if n > limit):
        members = sorted((e for e in examples if e.target_tool == domain and e.desirable), key=lambda e: e.rank,
                         reverse=True)
        capped.extend(members[limit:])
    dropped = {id(e) for e in capped}
    return [e for e in examples if id(e) not in dropped], capped


def prompt_groups(examples: list[Example], threshold: float) -> list[list[int]]:
    """Indexes of examples whose final prompts are equal or near duplicates, as connected groups."""
    parent = list(range(len(examples)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[str, int] = {}
    for i, example in enumerate(examples):
        parent[root(i)] = root(first.setdefault(example.prompt_key, i))
    if threshold < 1:
        # a repeated prompt is already joined to its first occurrence, which stands for it in the index
        distinct = [i for i, e in enumerate(examples) if first[e.prompt_key] == i]
        keys = [examples[i].prompt_key for i in distinct]
        for position, earlier in NearIndex(threshold).earlier_candidates(keys).items():
            mine = shingles(keys[position])
            for j in earlier:
                if jaccard(mine, shingles(keys[j])) >= threshold:
                    parent[root(distinct[position])] = root(distinct[j])
    groups: dict[int, list[int]] = {}
    for i in range(len(examples)):
        groups.setdefault(root(i), []).append(i)
    return list(groups.values())


def split_eval(examples: list[Example], fraction: float, seed: int, threshold: float) -> tuple[list[Example], list[Example]]:
    """(train, eval) with about `fraction` held out; prompt groups go whole to one side, train never empty."""
    wanted = min(int(fraction * len(examples) + 0.5), len(examples) - 1)
    groups = prompt_groups(examples, threshold)
    if wanted <= 0 or len(groups) < 2:
        return list(examples), []
    order = sorted(groups, key=lambda g: short_hash(str(seed), min(examples[i].prompt_key for i in g)))
    held: set[int] = set()
    for group in order:
        if len(held) + len(group) <= wanted:
            held.update(group)
        if len(held) >= wanted:
            break
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


def leaked_prompts(train: list[Example], eval_examples: list[Example], threshold: float) -> list[Example]:
    """Train examples whose prompt is equal or near to an eval prompt (must be empty in a snapshot)."""
    if not eval_examples or not train:
        return []
    keys = {e.prompt_key for e in eval_examples}
    index = NearIndex.of([e.prompt_key for e in eval_examples], min(threshold, 0.999))
    near = index.matches_any([e.prompt_key for e in train])
    return [e for e, hit in zip(train, near) if hit or e.prompt_key in keys]


# --- the compact path: selected examples spooled to disk, small columns in memory ---------------------------------
# A run over a big log selects hundreds of thousands of examples. Holding each as an Example (texts, shingles, ids)
# made peak memory grow with the log, so `run_curate` parks every selected example as one line in a temp file beside
# the snapshots (`.*.tmp`: a killed run's leftover is removed by the next one) and keeps only fixed-size columns per
# example: what the pure functions above need to decide, computed as each example arrives. Decisions read texts back
# from the spool only for the few candidate pairs MinHash proposes. Every decision is the one the list functions
# above make (same order, ties, survivors and merged sources), so snapshots are byte-identical.
_CHUNK = 4096


def _hex64(text: str) -> int:
    return int(text, 16)


def _utf8(text: str) -> bytes:
    # UTF-8 byte order is code point order, so numpy's bytes comparison orders these as Python orders the strings
    return text.encode("utf-8", "surrogatepass")


def _earlier_from_keys(keys: Any) -> dict[int, list[int]]:
    """`NearIndex.earlier_candidates` over precomputed band keys (rows in text order)."""
    import numpy as np

    earlier: dict[int, set[int]] = {}
    for band in range(keys.shape[1]):
        order = np.argsort(keys[:, band], kind="stable")  # equal keys keep ascending text order
        column = keys[order, band]
        repeats = np.flatnonzero(column[1:] == column[:-1])
        group: list[int] = []
        for position in repeats.tolist():
            if not group or group[-1] != int(order[position]):
                group = [int(order[position])]
            later = int(order[position + 1])
            earlier.setdefault(later, set()).update(group)
            group.append(later)
    return {i: sorted(js) for i, js in earlier.items()}


def _give_back_freed_memory() -> None:
    """Hand the heap pages freed by the many small column pieces back to the OS (glibc keeps them otherwise, and
    they would count in peak memory as if still used). A no-op where the C library has no malloc_trim."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


class Spool:
    """Selected examples as sealed JSONL lines in a temp file; read back by (offset, length)."""

    def __init__(self, folder: Path):
        self.folder, self._made_folder = folder, not folder.exists()
        self.path: Path | None = None
        self._file: Any = None
        self.size = 0
        self._unflushed = False
        self._cipher = cipher_from_env()

    def _open(self) -> None:  # on the first example, so a run that selects nothing creates nothing
        ensure_dir(self.folder)
        fd, name = temp_file(self.folder / "curate_spool", prefix=".curate_spool.")
        os.fchmod(fd, FILE_MODE)
        self.path, self._file = Path(name), os.fdopen(fd, "w+b")

    def add(self, example: Example) -> tuple[int, int]:
        if self._file is None:
            self._open()
        line = dumps_line(_seal(example.to_record(), self._cipher))
        self._file.write(line)
        self._unflushed = True
        offset, self.size = self.size, self.size + len(line)
        return offset, len(line)

    def record(self, offset: int, length: int) -> dict:
        if self._unflushed:
            self._file.flush()
            self._unflushed = False
        return _open(orjson.loads(os.pread(self._file.fileno(), length, offset)), self._cipher)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        if self._made_folder:
            with contextlib.suppress(OSError):
                self.folder.rmdir()  # only when still empty


class ExamplePool:
    """The selected examples of one run: spooled lines plus numpy columns (rank, ids, times, domain, MinHash band
    keys of the text and of the prompt), and the merged sources/users of duplicates that absorbed others."""

    def __init__(self, spool: Spool, seed: int, threshold: float):
        self.spool, self.seed, self.threshold = spool, str(seed), threshold
        self.near = threshold < 1
        self._index = NearIndex(threshold) if self.near else None
        self.tools: list[str] = []
        self._tool_codes: dict[str, int] = {}
        self._rows: list[tuple] = []
        self._texts: list[str] = []
        self._chunks: list[dict[str, Any]] = []
        self.cols: dict[str, Any] = {}
        self.extras: dict[int, tuple[list[str], list[str]]] = {}  # row -> merged (source_ids, user_hashes)

    # building
    def add(self, example: Example) -> None:
        offset, _ = self.spool.add(example)
        tool = -1 if example.target_tool is None else self._tool_codes.setdefault(example.target_tool, len(self._tool_codes))
        if tool == len(self.tools):
            self.tools.append(example.target_tool)
        kind, rating, recorded = example.rank
        same_time = example.created_at == recorded  # the usual case: then `created` stays empty, saving its bytes
        self._rows.append((_hex64(example.id), offset, kind, rating, _utf8(recorded), same_time,
                           b"" if same_time else _utf8(example.created_at), tool, _hex64(short_hash(self.seed, example.prompt_key))))
        if self.near:
            self._texts.append(example.text)
        if len(self._rows) >= _CHUNK:
            self._flush()

    def _flush(self) -> None:
        import numpy as np

        if not self._rows and self._chunks:
            return
        names = ("id", "offset", "kind", "rating", "recorded", "same_time", "created", "tool", "prompt_hash")
        dtypes = (np.uint64, np.int64, np.int8, np.float64, bytes, np.bool_, bytes, np.int32, np.uint64)
        columns = list(zip(*self._rows)) or [()] * len(names)
        chunk = {name: np.array(values, dtype=dtype) for name, values, dtype in zip(names, columns, dtypes)}
        if self.near:
            chunk["text_keys"] = self._index.band_keys(self._texts)
        self._chunks.append(chunk)
        self._rows, self._texts = [], []

    def finish(self) -> None:
        import numpy as np

        self._flush()
        for name in list(self._chunks[0]):  # column by column, freeing the pieces as it goes
            self.cols[name] = np.concatenate([chunk.pop(name) for chunk in self._chunks])
        self._chunks = []
        _give_back_freed_memory()

    def __len__(self) -> int:
        return len(self.cols["id"]) if self.cols else 0

    # reading back
    def record(self, row: int) -> dict:
        offsets = self.cols["offset"]  # lines lie back to back in the spool: a line ends where the next begins
        start = int(offsets[row])
        end = int(offsets[row + 1]) if row + 1 < len(offsets) else self.spool.size
        record = self.spool.record(start, end - start)
        if row in self.extras:
            record["source_ids"], record["user_hashes"] = (list(x) for x in self.extras[row])
        return record

    def example(self, row: int) -> Example:
        return Example.from_record(self.record(row))

    def text(self, row: int) -> str:
        """`Example.text` of a row, straight from its spooled messages (already cleaned when they were spooled)."""
        messages = self.record(row)["messages"]
        return "\n".join(normalise(m["content"]) for m in messages if m["role"] != "system")

    def prompt_key(self, row: int) -> str:
        """`Example.prompt_key` of a row, straight from its spooled messages."""
        messages = self.record(row)["messages"]
        return normalise(next((m["content"] for m in reversed(messages) if m["role"] == "user"), ""))

    def rank(self, row: int) -> tuple:
        return int(self.cols["kind"][row]), float(self.cols["rating"][row]), self.cols["recorded"][row].decode("utf-8", "surrogatepass")

    def absorb(self, keep: int, drop: int) -> None:
        """`Example.absorb` where `keep` is known to win: keep's sources first, users merged and sorted."""
        kept, dropped = self.record(keep), self.record(drop)
        sources = list(dict.fromkeys(kept["source_ids"] + dropped["source_ids"]))
        self.extras[keep] = (sources, sorted(set(kept["user_hashes"]) | set(dropped["user_hashes"])))

    def rank_desc(self, rows: Any) -> Any:
        """`sorted(rows, key=rank, reverse=True)`: best first, equal ranks in their given order."""
        import numpy as np

        if len(rows) == 0:
            return rows
        _, recorded = np.unique(self.cols["recorded"][rows], return_inverse=True)
        order = np.lexsort((np.arange(len(rows)), -recorded.astype(np.int64), -self.cols["rating"][rows],
                            -self.cols["kind"][rows].astype(np.int64)))
        return rows[order]

    def prompt_band_keys(self, rows: Any) -> Any:
        """Band keys of these rows' prompts, read back from the spool a chunk at a time (computed here, not on
        arrival, so they are never held beside the text keys)."""
        import numpy as np

        keys = np.empty((len(rows), self._index._bands), dtype=np.uint64)
        for start in range(0, len(rows), _CHUNK):
            prompts = [self.prompt_key(row) for row in rows[start : start + _CHUNK].tolist()]
            keys[start : start + len(prompts)] = self._index.band_keys(prompts)
        return keys

    def forget_text_keys(self) -> None:
        """Near-dedupe is done: its keys are not needed again."""
        self.cols.pop("text_keys", None)
        _give_back_freed_memory()

    def tool_of(self, row: int) -> str | None:
        code = int(self.cols["tool"][row])
        return None if code < 0 else self.tools[code]


def pooled_dedupe_exact(pool: ExamplePool) -> tuple[Any, int]:
    """`dedupe_exact` over the pool in arrival order: (survivor rows in first-arrival order, number collapsed)."""
    import numpy as np

    if len(pool) == 0:
        return np.zeros(0, dtype=np.int64), 0
    _, first, inverse, counts = np.unique(pool.cols["id"], return_index=True, return_inverse=True, return_counts=True)
    survivors = first.copy()
    by_group = np.argsort(inverse.ravel(), kind="stable")  # each group's rows together, in arrival order
    ends = np.cumsum(counts)
    for group in np.flatnonzero(counts > 1).tolist():
        survivors[group] = _absorb_chain(pool, by_group[ends[group] - counts[group] : ends[group]].tolist())
    return survivors[np.argsort(first, kind="stable")], int(len(pool) - len(first))


def _absorb_chain(pool: ExamplePool, members: list[int]) -> int:
    """Replays `kept.absorb(next)` over duplicates in arrival order; returns the surviving row."""
    kept = members[0]
    for row in members[1:]:
        if pool.rank(kept) >= pool.rank(row):
            pool.absorb(kept, row)
        else:
            pool.absorb(row, kept)
            kept = row
    return kept


def pooled_dedupe_near(pool: ExamplePool, rows: Any) -> tuple[Any, int]:
    """`dedupe_near` over pooled rows: (survivors, best first, number collapsed)."""
    import numpy as np

    if not pool.near or len(rows) < 2:
        return rows, 0
    ordered = pool.rank_desc(rows)
    candidates = _earlier_from_keys(pool.cols["text_keys"][ordered])
    kept = bytearray(len(ordered))
    text_of = _recent(lambda k: pool.text(int(ordered[k])))
    shingles_of = lambda k: shingles(text_of(k))  # noqa: E731
    for i in range(len(ordered)):
        earlier = [j for j in candidates.get(i, ()) if kept[j]]
        match = _first_match(shingles_of, i, earlier, pool.threshold)
        if match is None:
            kept[i] = 1
        else:
            pool.absorb(int(ordered[match]), int(ordered[i]))
    survivors = ordered[np.frombuffer(bytes(kept), dtype=np.uint8).astype(bool)]
    return survivors, len(rows) - len(survivors)


def _first_match(shingles_of: Callable[[int], set[str]], i: int, candidates: list[int], threshold: float) -> int | None:
    if not candidates:
        return None
    mine = shingles_of(i)
    return next((j for j in candidates if jaccard(mine, shingles_of(j)) >= threshold), None)


def _recent(read: Callable[[int], str], limit: int = 4096) -> Callable[[int], str]:
    """`read` with the texts of recent positions kept (candidates cluster around the same earlier texts); emptied
    when full, so it holds a few MB at most."""
    cache: dict[int, str] = {}

    def cached(k: int) -> str:
        text = cache.get(k)
        if text is None:
            if len(cache) >= limit:
                cache.clear()
            text = cache[k] = read(k)
        return text

    return cached


def pooled_cap_domains(pool: ExamplePool, rows: Any, cap: float) -> tuple[Any, Any]:
    """`cap_domains` over pooled rows: (kept rows, capped rows)."""
    import numpy as np

    desirable = pool.cols["kind"][rows] != KIND_RANK["unhelpful"]
    tools = np.where(desirable, pool.cols["tool"][rows], -1)
    codes, sizes = np.unique(tools[tools >= 0], return_counts=True)
    if cap >= 1 or len(codes) < 2:
        return rows, rows[:0]
    limit = max(1, math.floor(cap * int(desirable.sum())))
    capped: list[Any] = []
    for code in sorted((int(c) for c, n in zip(codes, sizes) if n > limit), key=lambda c: pool.tools[c]):
        capped.append(pool.rank_desc(rows[tools == code])[limit:])
    dropped = np.concatenate(capped) if capped else rows[:0]
    return rows[~np.isin(rows, dropped)], dropped


def pooled_split_eval(pool: ExamplePool, rows: Any, fraction: float) -> tuple[Any, Any]:
    """`split_eval` over pooled rows: (train rows, eval rows), each in the given order."""
    import numpy as np

    wanted = min(int(fraction * len(rows) + 0.5), len(rows) - 1)
    _, group_of, sizes = np.unique(_pooled_prompt_roots(pool, rows), return_inverse=True, return_counts=True)
    if wanted <= 0 or len(sizes) < 2:
        return rows, rows[:0]
    members = np.argsort(group_of.ravel(), kind="stable")  # each group's positions together, ascending
    ends = np.cumsum(sizes)
    # short_hash(seed, smallest prompt of the group) as a number sorts as its fixed-width hex text does
    order_keys = np.empty(len(sizes), dtype=np.uint64)
    singles = sizes == 1
    order_keys[singles] = pool.cols["prompt_hash"][rows[members[(ends - 1)[singles]]]]
    for group in np.flatnonzero(~singles).tolist():
        positions = members[ends[group] - sizes[group] : ends[group]].tolist()
        smallest = min(pool.prompt_key(int(rows[i])) for i in positions)
        order_keys[group] = _hex64(short_hash(pool.seed, smallest))
    held = np.zeros(len(rows), dtype=bool)
    taken = 0
    for group in np.argsort(order_keys, kind="stable").tolist():
        size = int(sizes[group])
        if taken + size <= wanted:
            held[members[ends[group] - size : ends[group]]] = True
            taken += size
        if taken >= wanted:
            break
    return rows[~held], rows[held]


def _pooled_prompt_roots(pool: ExamplePool, rows: Any) -> Any:
    """`prompt_groups` over pooled rows, as one group label per position (connected components: equal prompts,
    matched by their 64-bit seeded hash, and near ones). Only positions that join another are in the union-find."""
    import numpy as np

    parent: dict[int, int] = {}

    def root(i: int) -> int:
        while parent.get(i, i) != i:
            parent[i] = parent.get(parent[i], parent[i])
            i = parent[i]
        return i

    def join(i: int, j: int) -> None:
        a, b = root(i), root(j)
        if a != b:
            parent[a] = b

    _, first, inverse = np.unique(pool.cols["prompt_hash"][rows], return_index=True, return_inverse=True)
    representative = first[inverse.ravel()]
    for i in np.flatnonzero(representative != np.arange(len(rows))).tolist():
        join(i, int(representative[i]))
    if pool.near:
        distinct = np.sort(first)
        prompt_of = _recent(lambda k: pool.prompt_key(int(rows[distinct[k]])))
        shingles_of = lambda k: shingles(prompt_of(k))  # noqa: E731
        for position, earlier in _earlier_from_keys(pool.prompt_band_keys(rows[distinct])).items():
            mine = shingles_of(position)
            for j in earlier:
                if jaccard(mine, shingles_of(j)) >= pool.threshold:
                    join(int(distinct[position]), int(distinct[j]))
    roots = np.arange(len(rows))
    for i in list(parent):
        roots[i] = root(i)
    return roots


def pooled_chronological(pool: ExamplePool, rows: Any) -> Any:
    """Rows sorted by (created_at, id), as `_chronological` sorts examples."""
    import numpy as np

    if len(rows) == 0:
        return rows
    created_at = np.where(pool.cols["same_time"][rows], pool.cols["recorded"][rows], pool.cols["created"][rows])
    _, created = np.unique(created_at, return_inverse=True)
    return rows[np.lexsort((pool.cols["id"][rows], created))]


# --- replay -----------------------------------------------------------------------------------------
def replay_size(fraction: float, new_examples: int) -> int:
    """replay_fraction x new examples, at least one when replay is on and there is something new."""
    return max(1, int(fraction * new_examples + 0.5)) if fraction > 0 and new_examples > 0 else 0


def sample_replay(examples: Iterable[Example], size: int, salt: str) -> list[Example]:
    """A seeded uniform sample of `size` distinct examples (bottom-k by salted id hash), in constant memory."""
    heap: list[tuple[int, str, Example]] = []  # max-heap on priority via negation
    members: set[str] = set()
    for example in examples:
        if size <= 0 or example.id in members:
            continue
        priority = -int(short_hash(salt, example.id), 16)
        if len(heap) < size:
            heapq.heappush(heap, (priority, example.id, example))
            members.add(example.id)
        elif priority > heap[0][0]:
            _, evicted, _ = heapq.heapreplace(heap, (priority, example.id, example))
            members.discard(evicted)
            members.add(example.id)
    return [e for _, _, e in sorted(heap, reverse=True)]


def choose_replay(pool: list[Example], size: int, new: list[Example], threshold: float) -> list[Example]:
    """The first `size` pooled examples that repeat nothing new: no same or near example, no same or near
    prompt. `new` holds train and eval, so a replayed prompt can never also be an eval prompt."""
    if not pool or size <= 0:
        return []
    texts = NearIndex.of([e.text for e in new], min(threshold, 0.999)).matches_any([e.text for e in pool])
    prompts = NearIndex.of([e.prompt_key for e in new], min(threshold, 0.999)).matches_any([e.prompt_key for e in pool])
    ids, prompt_keys = {e.id for e in new}, {e.prompt_key for e in new}
    chosen: list[Example] = []
    for example, near_text, near_prompt in zip(pool, texts, prompts):
        if near_text or near_prompt or example.id in ids or example.prompt_key in prompt_keys:
            continue
        chosen.append(example)
        ids.add(example.id)
        prompt_keys.add(example.prompt_key)
        if len(chosen) == size:
            break
    return chosen


# --- cursor -----------------------------------------------------------------------------------------
def _moment(text: Any) -> datetime | None:
    try:
        return parse_time(text) if isinstance(text, str) else None
    except ValueError:
        return None


@dataclass
class Cursor:
    """Where the previous snapshot stopped: the newest interaction and feedback event it saw (by
    `recorded_at` / event `created_at`), the ids seen within CURSOR_SLACK of each, and the turns its domain
    cap held back (so a flooding domain is spread over snapshots, not lost)."""

    recorded_at: str | None = None
    recorded_ids: list[str] = field(default_factory=list)
    feedback_at: str | None = None
    feedback_ids: list[str] = field(default_factory=list)
    last_interaction_id: str | None = None  # the newest interaction included in the snapshot
    deferred_ids: list[str] = field(default_factory=list)  # capped turns, offered again with the next new material

    @classmethod
    def from_dict(cls, data: Any) -> "Cursor":
        if not isinstance(data, dict):
            return cls()
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @cached_property
    def _edges(self) -> tuple:
        return _moment(self.recorded_at), set(self.recorded_ids), _moment(self.feedback_at), set(self.feedback_ids)

    def new_interaction(self, moment: datetime, ident: str) -> bool:
        top, edge, _, _ = self._edges
        return _after(moment, ident, top, edge)

    def new_feedback(self, moment: datetime, ident: str) -> bool:
        _, _, top, edge = self._edges
        return _after(moment, ident, top, edge)


def _after(moment: datetime, ident: str, top: datetime | None, edge: set[str]) -> bool:
    if top is None or moment > top:
        return True
    return moment > top - CURSOR_SLACK and ident not in edge


class Watermark:
    """The newest timestamp seen, and the ids seen within CURSOR_SLACK of it."""

    def __init__(self) -> None:
        self.top: datetime | None = None
        self.top_text: str | None = None
        self._recent: list[tuple[datetime, str]] = []
        self._pruned_at = 0

    def see(self, moment: datetime, text: str, ident: str) -> None:
        if self.top is None or moment > self.top:
            self.top, self.top_text = moment, text
        if moment > self.top - CURSOR_SLACK:
            self._recent.append((moment, ident))
            if len(self._recent) > max(1024, 2 * self._pruned_at):
                self._prune()

    def _prune(self) -> None:
        if self.top is not None:
            self._recent = [(m, i) for m, i in self._recent if m > self.top - CURSOR_SLACK]
        self._pruned_at = len(self._recent)

    def edge(self) -> list[str]:
        self._prune()
        return sorted({i for _, i in self._recent})


def previous_cursor(snapshots: list[dict]) -> Cursor:
    return Cursor.from_dict(snapshots[-1].get("cursor")) if snapshots else Cursor()


# --- streaming passes -----------------------------------------------------------------------------------
def count_lines(path: Path) -> int:
    """Newlines in the file, read in blocks (for a progress total; cheap next to parsing)."""
    if not path.exists():
        return 0
    with open(path, "rb") as handle:
        return sum(block.count(b"\n") for block in iter(lambda: handle.read(1 << 20), b""))


def _ticker(progress: Progress | None, phase: str, total: int | None) -> Callable[[int, bool], None]:
    def tick(done: int, final: bool = False) -> None:
        if progress and (final or done % PROGRESS_EVERY == 0):
            progress(phase, done, total)

    tick(0, True)
    return tick


@dataclass
class FeedbackScan:
    """Pass 1: every feedback event merged per interaction, in log order."""

    table: "FeedbackTable" = field(default_factory=lambda: FeedbackTable())
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


def scan_feedback(path: Path, cursor: Cursor, progress: Progress | None = None, total: int | None = None) -> FeedbackScan:
    scan = FeedbackScan()
    if cursor._edges[2] is None:  # no feedback seen before: every event is late, so `late` is every target
        scan.late = _KeysOf(scan.table)
    tick = _ticker(progress, "reading feedback", total)
    cipher = cipher_from_env()
    for number, record in iter_jsonl(path, scan.report):
        scan.lines = number
        tick(number)
        if isinstance(record, dict) and record.get("type") == FEEDBACK:
            _add_event(scan, open_messages(record, cipher), cursor)
    scan.lines = max(scan.lines, scan.report.bad_lines[-1][0] if scan.report.bad_lines else 0)
    scan.table.freeze()
    tick(scan.lines, True)
    return scan


def _add_event(scan: FeedbackScan, record: dict, cursor: Cursor) -> None:
    target, moment = record.get("interaction_id"), _moment(record.get("created_at"))
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


def raters_of(scan: "FeedbackScan", interaction_id: str) -> set[str]:
    return scan.table.raters(interaction_id)


@dataclass
class Gathered:
    """Pass 2: the examples selected from the new material, and what happened to the rest."""

    examples: list[Example] = field(default_factory=list)
    tally: Counter = field(default_factory=Counter)
    watermark: Watermark = field(default_factory=Watermark)
    exact_duplicates: int = 0


@dataclass
class _Pass2:
    """Decides, record by record, whether an interaction is new material and what it yields."""

    scan: FeedbackScan
    cursor: Cursor
    already_snapshotted: set[str]
    rules: Rules
    full: bool
    out: Gathered = field(default_factory=Gathered)

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
        tally = self.out.tally
        tally["interactions"] += 1
        ident, stamp = record.get("id"), record.get("recorded_at") or record.get("created_at")
        moment = _moment(stamp)
        if not isinstance(ident, str) or moment is None:
            tally["bad_records"] += 1
            return None
        if ident in self.scan.feedback:
            self.rated_seen.append(hash(ident))
        self.out.watermark.see(moment, stamp, ident)
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
            self.out.tally[f"dropped.{reason}"] += 1
            return None
        try:
            interaction = Interaction.from_dict(record)
            if interaction.id in self.scan.feedback:
                interaction.feedback = merge_feedback(interaction.feedback, self.scan.feedback[interaction.id])
            outcome = select(interaction, self.rules)
        except (TypeError, ValueError, KeyError, AttributeError):  # a record edited into nonsense is dropped, not fatal
            outcome = "malformed"
        if isinstance(outcome, str):
            self.out.tally[f"dropped.{outcome}"] += 1
            return None
        self.out.tally[f"selected.{outcome.kind}"] += 1
        raters = raters_of(self.scan, interaction.id)
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


def gather_examples(
    path: Path,
    scan: FeedbackScan,
    cursor: Cursor,
    already_snapshotted: set[str],
    rules: Rules,
    full: bool,
    progress: Progress | None = None,
    pool: "ExamplePool | None" = None,
) -> Gathered:
    """Stream the interactions, take the new ones (plus old ones with new feedback), select and exact-dedupe
    (into `pool` when one is given: it spools them and dedupes later; else into `Gathered.examples`)."""
    state = _Pass2(scan, cursor, already_snapshotted, rules, full)
    tick = _ticker(progress, "selecting turns", scan.lines)
    cipher = cipher_from_env()

    def selected() -> Iterator[Example]:
        for number, record in iter_jsonl(path):
            if number > scan.lines:  # appended after pass 1: its feedback was not collected, leave it to the next run
                break
            tick(number)
            if isinstance(record, dict) and record.get("type") == INTERACTION:
                example = state.consider(open_messages(record, cipher))
                if example is not None:
                    yield example
        tick(scan.lines, True)

    if pool is None:
        state.out.examples, state.out.exact_duplicates = dedupe_exact(selected())
    else:
        for example in selected():
            pool.add(example)
        pool.finish()
    state.out.tally["orphan_feedback"] = state.orphans()
    _give_back_freed_memory()
    return state.out


def snapshot_paths(settings: Settings, snapshots: list[dict], keys: tuple[str, ...]) -> Iterator[tuple[str, Path | None]]:
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


def earlier_examples(settings: Settings, snapshots: list[dict], expires_before: datetime | None, tally: Counter) -> Iterator[Example]:
    """Train examples of earlier snapshots, as replay candidates (expired ones left out)."""
    cipher = cipher_from_env()
    for _, path in snapshot_paths(settings, snapshots, ("file",)):
        if path is None:
            tally["replay_sources_missing"] += 1
            continue
        for _, record in iter_jsonl(path):
            if record.get("label") is False:  # "no" answers are not replayed: replay is SFT on what was good
                continue
            example = Example.from_record(open_messages(record, cipher), kind="replay")
            moment = _moment(example.created_at) if example else None
            if example and not (expires_before and moment and moment < expires_before):
                yield example


# --- the run ----------------------------------------------------------------------------------------
def _counts(tally: Counter, scan: FeedbackScan, exact: int, near: int, capped_tools: list[str | None]) -> dict:
    return {
        "lines": scan.lines,
        "bad_lines": scan.report.skipped,
        "torn_tail": scan.report.torn_tail,
        "bad_records": scan.bad_records + tally["bad_records"],
        "interactions": tally["interactions"],
        "feedback_events": scan.events,
        "orphan_feedback": tally["orphan_feedback"],
        "new_interactions": tally["new_interactions"],
        "late_feedback": tally["late_feedback"],
        "late_feedback_already_in_snapshot": tally["late_feedback_already_in_snapshot"],
        "deferred": tally["deferred"],
        "selected": {k: tally[f"selected.{k}"] for k in KIND_WEIGHTS},
        "dropped": {r: tally[f"dropped.{r}"] for r in DROP_REASONS},
        "deduped": {"exact": exact, "near": near},
        "capped": {"total": len(capped_tools), "by_domain": dict(sorted(Counter(capped_tools).items()))},
        "new_examples": 0,
        "replayed": 0,
        "replay_sources_missing": tally["replay_sources_missing"],
        "train": 0,
        "eval": 0,
    }


def _settings_used(settings: Settings, rules: Rules) -> dict:
    return {**dataclasses.asdict(settings.curate), "include_unrated": rules.include_unrated}


def _why_nothing(counts: dict, log: Path) -> str:
    if counts["lines"] == 0:
        return f"no interactions logged yet ({log} is empty or missing)"
    considered = counts["new_interactions"] + counts["late_feedback"]
    if considered == 0:
        return "no interactions or feedback since the last snapshot"
    reasons = ", ".join(f"{n} {r}" for r, n in counts["dropped"].items() if n)
    return f"{considered} new turn(s), none selected ({reasons or 'all capped or duplicates'})"


def new_snapshot_id(settings: Settings, taken: set[str], now: datetime) -> str:
    """curated_YYYYMMDD_HHMMSS, with _2, _3... when that second is already used."""
    base = f"curated_{now.astimezone(timezone.utc):%Y%m%d_%H%M%S}"
    candidate, n = base, 1
    while candidate in taken or (settings.curated_dir / f"{candidate}.jsonl").exists():
        n += 1
        candidate = f"{base}_{n}"
    return candidate


def _chronological(examples: list[Example]) -> list[Example]:
    return sorted(examples, key=lambda e: (e.created_at, e.id))


def write_snapshot(settings: Settings, doc: dict, train: Iterable[dict], eval_records: Iterable[dict], manifest: dict,
                   now: datetime) -> dict:
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
            yield dumps_line(_seal(record, cipher))

    sha = {"train": atomic_write_lines(paths["train"], lines(train, "train")),
           "eval": atomic_write_lines(paths["eval"], lines(eval_records, "eval"))}
    relative = {k: str(p.relative_to(settings.home)) for k, p in paths.items()}
    users = sorted(seen_users)
    train_count, eval_count = written["train"], written["eval"]
    manifest = {**manifest, "status": "created", "id": snapshot_id, "files": relative, "sha256": sha, "user_hashes": users}
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


def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _replay(settings: Settings, snapshots: list[dict], new_count: int, new: Callable[[], list[Example]], rules: Rules,
            tally: Counter) -> list[Example]:
    """A seeded sample of earlier train examples that repeats nothing in `new()` (train and eval; built only when
    replay is on, and an incremental run's new material is small)."""
    config = settings.curate
    size = replay_size(config.replay_fraction, new_count)
    if not snapshots or size == 0:
        return []
    # a different salt per run, so successive snapshots replay different earlier examples
    pool = sample_replay(earlier_examples(settings, snapshots, rules.expires_before, tally), 3 * size + 8,
                         salt=f"{config.seed}:{len(snapshots)}")
    return choose_replay(pool, size, new(), config.near_dup_threshold)


def _next_cursor(gathered: Gathered, scan: FeedbackScan, previous: Cursor, pool: ExamplePool, new: Any, capped: Any) -> Cursor:
    import numpy as np

    have_feedback = scan.watermark.top is not None
    _, recorded = np.unique(pool.cols["recorded"][new], return_inverse=True)
    newest = pool.record(int(new[int(np.argmax(recorded))]))  # the first of the latest, as max() picks
    return Cursor(
        recorded_at=gathered.watermark.top_text,
        recorded_ids=gathered.watermark.edge(),
        feedback_at=scan.watermark.top_text if have_feedback else previous.feedback_at,
        feedback_ids=scan.watermark.edge() if have_feedback else previous.feedback_ids,
        last_interaction_id=newest["source_ids"][0],
        deferred_ids=sorted({s for row in capped.tolist() for s in pool.record(row)["source_ids"]}),
    )


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


@contextlib.contextmanager
def _no_cyclic_gc() -> Iterator[None]:
    """Curate builds hundreds of thousands of small acyclic objects; Python's cyclic collector would traverse all
    of them again and again (time growing faster than the log). Reference counting still frees everything."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def run_curate(
    settings: Settings,
    *,
    full: bool = False,
    include_unrated: bool | None = None,
    note: str | None = None,
    progress: Progress | None = None,
    now: datetime | None = None,
) -> dict:
    """Curate the new material into a snapshot. Returns its manifest (`status` "created"), or, when there is
    nothing new, a manifest with `status` "nothing_new", `id` None and a `message`, having written nothing."""
    now = now or datetime.now(timezone.utc)
    config = settings.curate
    rules = Rules.from_config(config, include_unrated, now)
    with workspace_lock(settings.lock_dir, "curate"), _no_cyclic_gc():
        if config.retention_days > 0:  # retention is applied to the raw log on every curate, under the same lock
            from .capture.gdpr import drop_expired

            drop_expired(settings, config.retention_days, now=now)
        doc = registry.load(settings)
        snapshots = doc["snapshots"]
        remove_orphans(settings, snapshots)
        cursor = Cursor() if full else previous_cursor(snapshots)
        scan = scan_feedback(settings.raw_log, cursor, progress, count_lines(settings.raw_log) if progress else None)
        already = set() if full else ids_in_snapshots(settings, snapshots, scan.late)
        spool = Spool(settings.curated_dir)  # after remove_orphans, which would remove it
        try:
            return _curate_pooled(settings, doc, scan, cursor, already, rules, full, note, progress, now,
                                  ExamplePool(spool, config.seed, config.near_dup_threshold))
        finally:
            spool.close()


def _curate_pooled(settings: Settings, doc: dict, scan: FeedbackScan, cursor: Cursor, already: set[str], rules: Rules,
                   full: bool, note: str | None, progress: Progress | None, now: datetime, pool: ExamplePool) -> dict:
    config, snapshots = settings.curate, doc["snapshots"]
    gathered = gather_examples(settings.raw_log, scan, cursor, already, rules, full, progress, pool)
    scan.release()
    _give_back_freed_memory()
    if progress:
        progress("deduplicating", 0, None)
    unique, exact = pooled_dedupe_exact(pool)
    distinct, near = pooled_dedupe_near(pool, unique)
    pool.forget_text_keys()
    new, capped = pooled_cap_domains(pool, distinct, config.domain_cap)
    if progress:
        progress("deduplicating", len(unique), len(unique))
    counts = _counts(gathered.tally, scan, exact, near, [pool.tool_of(row) for row in capped.tolist()])
    manifest = {
        "schema_version": SCHEMA_VERSION, "type": "snapshot_manifest", "status": "nothing_new", "id": None,
        "created_at": _iso(now), "note": note, "mode": "full" if full else "incremental",
        "source": str(settings.raw_log.relative_to(settings.home)), "counts": counts,
        "settings": _settings_used(settings, rules), "previous_cursor": cursor.to_dict(),
    }
    deferred = set(cursor.deferred_ids)
    if not any(not deferred.issuperset(pool.record(row)["source_ids"]) for row in new.tolist()):  # capped last time: not news
        message = f"nothing new to curate: {_why_nothing(counts, settings.raw_log)}"
        return {**manifest, "cursor": cursor.to_dict(), "message": message}
    train, eval_rows = pooled_split_eval(pool, new, config.eval_fraction)
    replay = [] if full else _replay(settings, snapshots, len(new), lambda: [pool.example(row) for row in new.tolist()],
                                     rules, gathered.tally)
    counts.update(new_examples=len(new), replayed=len(replay), train=len(train) + len(replay), eval=len(eval_rows),
                  replay_sources_missing=gathered.tally["replay_sources_missing"])
    manifest.update(cursor=_next_cursor(gathered, scan, cursor, pool, new, capped).to_dict(),
                    replay_pool=[s["id"] for s in snapshots] if replay else [])
    return write_snapshot(settings, doc, _in_file_order(pool, train, replay), _in_file_order(pool, eval_rows, []),
                          manifest, now)


def _in_file_order(pool: ExamplePool, rows: Any, others: list[Example]) -> Iterator[dict]:
    """The records of pooled rows and of other examples, merged in `_chronological` order, read one at a time."""
    pooled = (pool.record(row) for row in pooled_chronological(pool, rows).tolist())
    return heapq.merge(pooled, (e.to_record() for e in _chronological(others)), key=lambda r: (r["created_at"], r["id"]))
