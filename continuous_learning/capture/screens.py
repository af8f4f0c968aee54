"""Screens: what each text needs from Presidio and spaCy, decided so that skipping the rest cannot change the
result (`Sanitizer._presidio_results` runs each component only where a screen says it can matter)."""
from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from . import names as name_rules
from .spans import placeholder_spans

# What each text needs from Presidio and spaCy (`Sanitizer._presidio_results`), decided so that skipping the rest
# cannot change the result:
#   SKIP      nothing: no recognizer's entity can be in the text;
#   PATTERNS  the pattern recognizers only (regexes and libphonenumber, no spaCy);
#   NER       also spaCy's NER: the text has a word a PERSON span needs (`has_name_word`);
#   +context  also tok2vec, tagger and lemmatizer, for the lemma context enhancer;
#   REPEAT    an exact repeat of an earlier text in the batch; FULL: the whole pipeline (unscreened entity types).
SKIP, PATTERNS, NER, REPEAT, FULL = "skip", "patterns", "ner", "repeat", "full"
NOT_NER = ["tok2vec", "tagger", "attribute_ruler", "lemmatizer"]  # NER has its own embedding layer
# What every match of each entity's recognizers contains, so that a text without it need not be searched: '@';
# seven digits in a row (libphonenumber is only asked then, and the shape patterns need 7-15 digits); an SSN's nine
# digits; a card's 4+3 digits; IBAN and IP digits (IPv4 'd.d', IPv6 ':'); a capital for the name cue patterns.
SEVEN_DIGITS = r"\d(?:[\s().+/-]{0,3}\d){6}"
ENTITY_NEEDS = {
    "EMAIL_ADDRESS": "@", "PHONE_NUMBER": SEVEN_DIGITS, "US_SSN": r"\d{3}[-. ]?\d{2}[-. ]?\d{4}",
    "CREDIT_CARD": r"\d{4}[- ]?\d{3}", "IBAN_CODE": r"\d", "IP_ADDRESS": r"\d\.\d|:", "PERSON": "[A-Z]",
}
_LETTER_RUN = re.compile(r"[^\W\d_]+")
_SENTENCE_END = re.compile(r"[.!?…]['\")\]’”]*\s+$|\n\s*$")
_TITLE_BEFORE = re.compile(r"\b(?:Mr|Mrs|Ms|Mx|Dr|Prof|St)\.\s*$")
# Closed-class words and common openers that are not given names (no "Will", "May", "Can", "Bill", "Hope"...).
_NEVER_NAMES = frozenset(
    """a an the this that these those there here it its i i'm i've i'll i'd i’m we you he she they my your our
    their his her what why how when where which who whom whose is are was were be been am do does did done have has
    had not no yes ok okay please thanks thank hi hello hey sure great good fine well so and but or if then than
    also just now still yet for from to in on at by of with about into over after before as all any some each
    every both either neither most many much more less few other such only even please could would should shall
    must might let lets let's let’s give tell show explain write list describe make find check use keep try add
    set run put get see note remember hold change clean replace install open close start stop turn wait read
    here's there's it's that's what's how's yes no sorry""".split()
)


def needs_regex(entities: Iterable[str]) -> re.Pattern:
    return re.compile("|".join(f"(?:{ENTITY_NEEDS.get(e, '')})" for e in entities))  # unknown: matches anywhere


def may_hold_name_word(text: str, doc: Any) -> bool:
    """Whether some NER span in `doc` could pass `has_name_word` and `Sanitizer._finish`: a letter run that is a
    name word and lies neither in a token with a digit (`spans.plausible` drops PERSON spans with digits; spans are
    whole tokens) nor in a placeholder (`Sanitizer._finish` drops spans touching one)."""
    placeholders = placeholder_spans(text)
    for match in _LETTER_RUN.finditer(text):
        start, end = match.span()
        if not _is_name_word(text, match) or any(p.start < end and start < p.end for p in placeholders):
            continue
        token = doc[_token_at(doc, start)]
        if token.idx + len(token) < end or not any(c.isdigit() for c in token.text):  # no digit, or across tokens
            return True
    return False


def _token_at(doc: Any, char: int) -> int:
    """Index of the token holding character `char` (a letter, so never whitespace)."""
    low, high = 0, len(doc) - 1
    while low < high:
        middle = (low + high + 1) // 2
        if doc[middle].idx <= char:
            low = middle
        else:
            high = middle - 1
    return low


def has_name_word(text: str, start: int, end: int) -> bool:
    """A spaCy PERSON span is kept only if it holds a whole letter run of the text that is a name word: small
    spaCy models tag capitalised dictionary words ("Firmware", "Torque") and codes as people."""
    for match in _LETTER_RUN.finditer(text, start, end):
        whole = (match.start() == 0 or not _LETTER_RUN.match(text, match.start() - 1)) and not _LETTER_RUN.match(
            text, match.end()
        )
        if whole and _is_name_word(text, match):
            return True
    return False


def _is_name_word(text: str, match: re.Match) -> bool:
    """Capitalised, two letters or more, and a listed first or last name or no English word; a function word
    ("The", "How") opening a sentence is none."""
    word = match.group()
    if len(word) < 2 or not word[0].isupper():
        return False
    lower = word.lower()
    if not (lower in name_rules.listed_names() or not name_rules.is_english(lower)):
        return False
    return lower not in _NEVER_NAMES or not _opens_sentence(text, match.start())


def _opens_sentence(text: str, start: int) -> bool:
    before = text[max(0, start - 12) : start]
    if start <= 12 and not text[:start].strip():
        return True
    return bool(_SENTENCE_END.search(before)) and not _TITLE_BEFORE.search(before)

