"""Span post-processing for the Sanitizer: the Span type, identifiers that must survive redaction, names that are
really things, and the merge of overlapping findings into one placeholder."""
from __future__ import annotations

import re
from dataclasses import dataclass

from . import names as name_rules

# Words that make a capitalised PERSON finding a role or a team ("Customer Service"), not a name.
_NOT_NAMES = frozenset(
    "team support service services customer customers desk help manager management department sales quality "
    "engineering engineer operations maintenance hiring office staff everyone all very really happy sir madam "
    "lead admin administrator shift line plant factory lab".split()
)

# Domain identifiers that must survive redaction. A detected span lying entirely inside one of these is dropped;
# a span that merely overlaps one (e.g. "order 555 123 4567") is still redacted.
_MONTHS = r"(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec)[a-z]*\.?"
_PROTECTED = re.compile(
    "|".join(
        [
            r"\b(?:lot|batch|part|order|serial|invoice|ticket|item|sku|po|job|run|line)\b\s*(?:no\.?|number|#)?\s*"
            r"[A-Z]{0,4}-?\d{1,9}[A-Z]?\b(?![-.]\d)",  # 10+ digits there is a phone: "direct line 2125550199"
            r"\b[A-Z]{1,4}-\d{1,8}[A-Z]?\b(?![-.]\d)",  # PX-3301, SN-88231
            r"\b\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2})?)?\b",  # ISO dates
            rf"\b{_MONTHS}\s+\d{{1,2}}(?:st|nd|rd|th)?(?:,?\s+\d{{4}})?\b",  # March 3, March 3rd, 2026
            rf"\b\d{{1,2}}(?:st|nd|rd|th)?\s+{_MONTHS}(?:\s+\d{{4}})?\b",  # 3 March 2026
            r"(?<![\w.])v?\d{1,3}\.\d{1,3}\.\d{1,3}(?![\w.]|\.\d)",  # versions: v2.4.1, 1.0.0 (not 212.555.0199)
            r"(?<![\w.])v\d+(?:\.\d+)?\b",  # v2, v2.4
            r"\b\d+(?:[.,]\d+)?\s*°\s*[CFK]\b",  # temperatures
            r"\b\d{1,2}:\d{2}(?::\d{2})?\b",  # times
            r"<[A-Z][A-Z0-9_]{2,}>",  # placeholders of earlier stages
        ]
    ),
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Span:
    entity_type: str
    start: int
    end: int
    score: float


def placeholder_spans(text: str) -> list[Span]:
    if "<" not in text:
        return []
    return [Span("PLACEHOLDER", m.start(), m.end(), 1.0) for m in _PLACEHOLDER.finditer(text)]


_PLACEHOLDER = re.compile(r"<[A-Z][A-Z0-9_]{2,}>")


def plausible(text: str, spans: list[Span]) -> list[Span]:
    protected = [m.span() for m in _PROTECTED.finditer(text)]
    shouting = name_rules.is_shouting(text)
    return [
        s
        for s in spans
        if not any(a <= s.start and s.end <= b for a, b in protected)
        and (s.entity_type != "PERSON" or _looks_like_name(text[s.start : s.end], shouting))
    ]


# "our wiki is called Atlas", "the newsletter is named The Quire": a thing's name, not a person's.
_THING_NAMED = re.compile(r"\b(?P<subject>[A-Za-z]+)\s+(?:is|are|was|were|gets|got)\s+(?:called|named|titled)\s+"
                          r"(?:(?:the|a|an)\s+)?$", re.IGNORECASE)
_PERSON_SUBJECTS = frozenset(
    """he she they who someone somebody guy man woman person boy girl baby son daughter wife husband partner mother
    mom mum father dad brother sister friend colleague coworker manager boss neighbor neighbour landlord landlady
    doctor nurse teacher uncle aunt cousin grandma grandpa kid child fiance fiancee nephew niece roommate flatmate
    tenant client customer patient hire intern engineer technician operator driver lead supervisor assistant lawyer
    contact owner author founder ceo director chef""".split()
)


def names_a_thing(text: str, start: int, end: int) -> bool:
    """The span follows "<thing> is called" and is not a listed first name: a product, project or place."""
    cue = _THING_NAMED.search(text, max(0, start - 60), start)
    if cue is None or cue.end() != start or cue.group("subject").lower() in _PERSON_SUBJECTS:
        return False
    first_names = name_rules.name_lists()[0]
    return not any(word.lower() in first_names for word in re.findall(r"[^\W\d_]+", text[start:end]))


def _looks_like_name(value: str, shouting: bool = False) -> bool:
    # The small spaCy model tags codes such as "B-204" or "v2.4.1" as PERSON; the cue patterns catch
    # capitalised roles ("Ask Customer Service"). In ALL CAPS text it tags plain words ("MY NAME IS").
    words = value.split()
    return (
        not any(c.isdigit() for c in value)
        and any(w[:1].isupper() for w in words)
        and not any(w.lower().strip(".,") in _NOT_NAMES for w in words)
        and not (shouting and all(name_rules.is_common_word(w.strip(".,")) for w in words))
    )


def resolve_overlaps(spans: list[Span]) -> list[Span]:
    """Overlapping spans become one span covering them all, typed by the best of them (score, then length), so
    that no part of a finding is left behind when two recognizers disagree on its extent."""
    groups: list[list[Span]] = []
    for span in sorted(spans, key=lambda s: (s.start, -s.end)):
        if groups and span.start < max(s.end for s in groups[-1]):
            groups[-1].append(span)
        else:
            groups.append([span])
    return [_union_span(group) for group in groups]


# A rule's generic kind gives way to a recognizer's specific one for the same value ("SSN 078-05-1120": US_SSN).
_GENERIC_KINDS = frozenset({"NATIONAL_ID"})


def _union_span(group: list[Span]) -> Span:
    best = max(group, key=lambda s: (s.entity_type not in _GENERIC_KINDS, s.score, s.end - s.start))
    return Span(best.entity_type, min(s.start for s in group), max(s.end for s in group), best.score)


def overlaps_any(span: Span, others: list[Span]) -> bool:
    return any(span.start < o.end and o.start < span.end for o in others)
