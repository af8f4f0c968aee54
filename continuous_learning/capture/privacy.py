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

This module holds the Sanitizer and its process-wide cache; `recognizers` builds the Presidio engine, `screens`
decides what each text needs from it, and `spans` cleans and merges what was found.
"""
from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass
from typing import Any

from ..core.settings import PrivacyConfig
from . import names as name_rules
from . import pii_rules, secret_scan
from .recognizers import LANG, build_analyzer, import_presidio_on_cpu
from .recognizers import SPACY_MODEL as SPACY_MODEL  # the model's name, still importable from here
from .screens import ENTITY_NEEDS, FULL, NER, NOT_NER, PATTERNS, REPEAT, SKIP, may_hold_name_word, needs_regex
from .spans import Span, names_a_thing, overlaps_any, placeholder_spans, plausible, resolve_overlaps

SALT_BYTES = 32
BATCH_SIZE = 256
_PERSON_RULE_SCORE = 0.7  # names.py: introduction cues, name lists, other scripts


@dataclass
class Sanitized:
    text: str  # text with each entity replaced by a typed placeholder such as <EMAIL_ADDRESS>
    entities: list[str]  # sorted unique entity types that were redacted
    flagged: bool  # a likely entity scored between flag_threshold and score_threshold and was left in place


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
                import_presidio_on_cpu()
                from presidio_analyzer.predefined_recognizers import SpacyRecognizer

                if "PERSON" in self.entities:
                    name_rules.name_lists()
                    name_rules.english_words()
                analyzer = build_analyzer(self.presidio_entities)
                entities = self.presidio_entities
                recognizers = analyzer.registry.get_recognizers(LANG, entities) if entities else []
                for recognizer in recognizers:
                    if not recognizer.is_loaded:
                        recognizer.load()
                        recognizer.is_loaded = True
                self._recognizers = recognizers
                self._ner_recognizers = [r for r in recognizers if isinstance(r, SpacyRecognizer)]
                self._ner_ids = frozenset(r.id for r in self._ner_recognizers)
                self._context_ids = frozenset(r.id for r in recognizers if r.context)
                self._pattern_recognizers = [
                    (r, needs_regex(r.supported_entities)) for r in recognizers if r.id not in self._ner_ids
                ]
                self._screened = set(self.presidio_entities) <= set(ENTITY_NEEDS)
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
        raw = self._analyzer.analyze(text=clean, language=LANG, **self._analyze_kwargs()) if clean else []
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

    def _rule_spans(self, text: str) -> list[Span]:
        spans = [Span(kind, a, b, 1.0) for kind, a, b in pii_rules.find_structured(text, self._rule_entities)]
        if "PERSON" in self._rule_entities:
            spans += [Span("PERSON", a, b, _PERSON_RULE_SCORE) for a, b in name_rules.find_names(text)]
        return spans

    def _presidio_results(self, texts: list[str], stages: Counter | None) -> list[list[Any]]:
        """What `AnalyzerEngine.analyze` returns for each text, computed with as little spaCy as gives the same:
        1. the pattern recognizers run directly (no NLP artifacts needed), each only on texts holding a character
           its entity needs (a digit, '@', ':', a capital);
        2. spaCy's tokenizer runs on texts with a capital letter, and NER (its own embedding layer, without
           tok2vec, tagger and lemmatizer) only on those with a word that can pass `has_name_word`: NER spans
           without one are dropped anyway, so skipping the rest changes nothing;
        3. tok2vec, tagger and lemmatizer run only where a pattern result below the top score has context words
           (a bare 9-digit SSN next to "ssn"), since only the lemma context enhancer reads lemmas.
        An entity type without a screen here sends every text through the whole pipeline."""
        self.load()
        if not self._screened:
            return self._full_pipeline(texts, stages)
        engine, kwargs = self._analyzer.nlp_engine, self._analyze_kwargs()
        nlp = engine.nlp[LANG]
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
                if may_hold_name_word(texts[i], doc):
                    ner_todo.append(i)
            for i, doc in zip(ner_todo, nlp.pipe((docs[i] for i in ner_todo), batch_size=BATCH_SIZE, disable=NOT_NER)):
                artifacts = engine._doc_to_nlp_artifact(doc, LANG)
                for recognizer in self._ner_recognizers:
                    found = recognizer.analyze(text=texts[i], entities=self.presidio_entities, nlp_artifacts=artifacts)
                    results[i] += _with_id(found, recognizer)
        context_todo = [i for i, found in enumerate(results) if any(self._needs_context(r) for r in found)]
        lemma_docs = (docs[i] if i in docs else texts[i] for i in context_todo)
        for i, doc in zip(context_todo, nlp.pipe(lemma_docs, batch_size=BATCH_SIZE, disable=["ner"])):
            artifacts = engine._doc_to_nlp_artifact(doc, LANG)
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
        for i, doc in zip(todo, engine.nlp[LANG].pipe((texts[i] for i in todo), batch_size=BATCH_SIZE)):
            artifacts = engine._doc_to_nlp_artifact(doc, LANG)
            results[i] = self._analyzer.analyze(text=texts[i], language=LANG, nlp_artifacts=artifacts, **kwargs)
        if stages is not None:
            stages[FULL] += len(todo)
            stages[SKIP] += len(texts) - len(todo)
        return results

    def _needs_context(self, result: Any) -> bool:
        return result.score < _MAX_SCORE and result.recognition_metadata.get(_ID_KEY) in self._context_ids

    def _presidio_spans(self, text: str, results: list[Any]) -> list[Span]:
        return plausible(text, [Span(r.entity_type, r.start, r.end, r.score) for r in results])

    def _analyze_kwargs(self) -> dict:
        low = min(self.config.flag_threshold, self.config.score_threshold)
        return {"entities": self.presidio_entities, "score_threshold": low}

    def _finish(self, text: str, secret_kinds: list[str], spans: list[Span]) -> Sanitized:
        spans = [s for s in spans if not overlaps_any(s, placeholder_spans(text))
                 and not (s.entity_type == "PERSON" and names_a_thing(text, s.start, s.end))]
        redact = resolve_overlaps([s for s in spans if s.score >= self.config.score_threshold])
        flagged = any(
            s.score >= self.config.flag_threshold and not overlaps_any(s, redact)
            for s in spans
            if s.score < self.config.score_threshold
        )
        kinds = sorted({*secret_kinds, *(s.entity_type for s in redact)})
        if not redact:
            return Sanitized(text, kinds, flagged)
        replaced = secret_scan.replace_spans(text, [(s.entity_type, s.start, s.end) for s in redact])
        return Sanitized(replaced, kinds, flagged)



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
