"""Selection: the rules of one run (`Rules`), and `select`, which turns a rated turn into an example or names the
reason it is dropped."""
from __future__ import annotations

import dataclasses
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from ..core.errors import ConfigError
from ..core.records import Feedback, Interaction, helpful_verdict, parse_time
from ..core.settings import CurateConfig
from .examples import KIND_RANK, KIND_WEIGHTS, Example
from .text import clean_messages, normalise

DROP_REASONS = (
    "expired", "private", "pii_flagged", "malformed", "unhelpful", "neutral", "unrated",
    "empty", "truncated", "too_short", "too_long", "blocklisted",
)


def _check(ok: bool, name: str, value: Any, rule: str) -> None:
    if not ok:
        raise ConfigError(f"curate.{name} must be {rule}, got {value!r}",
                          "fix it in cl.toml, the environment or the flag")


def validate_config(config: CurateConfig) -> None:
    """Reject knob values that would make curation meaningless before any work starts."""
    _check(config.unhelpful_threshold < config.helpful_threshold, "unhelpful_threshold", config.unhelpful_threshold,
           f"below curate.helpful_threshold ({config.helpful_threshold})")
    _check(0 <= config.min_chars <= config.max_chars, "min_chars", config.min_chars,
           f"between 0 and max_chars ({config.max_chars})")
    _check(0 < config.near_dup_threshold <= 1, "near_dup_threshold", config.near_dup_threshold, "in (0, 1]")
    _check(0 < config.domain_cap <= 1, "domain_cap", config.domain_cap, "in (0, 1]")
    _check(0 <= config.eval_fraction < 1, "eval_fraction", config.eval_fraction, "in [0, 1)")
    _check(config.replay_fraction >= 0, "replay_fraction", config.replay_fraction, ">= 0")
    _check(config.retention_days >= 0, "retention_days", config.retention_days, ">= 0")
    _check(all(isinstance(w, str) and w.strip() for w in config.blocklist), "blocklist", config.blocklist,
           "a list of non-empty strings")


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
    def from_config(cls, config: CurateConfig, include_unrated: bool | None = None,
                    now: datetime | None = None) -> Rules:
        validate_config(config)
        now = now or datetime.now(UTC)
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
    return Feedback(**{k: getattr(later, k) if getattr(later, k) is not None else getattr(earlier, k)
                       for k in _FEEDBACK_FIELDS})


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
    tool = interaction.target_tool
    return Example(
        messages=messages,
        kind=kind,
        weight=KIND_WEIGHTS[kind],
        source_ids=[str(interaction.id)],
        user_hashes=[sys.intern(str(interaction.user_hash))] if interaction.user_hash else [],
        target_tool=tool if isinstance(tool, str) and tool else None,
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
