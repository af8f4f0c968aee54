"""PII redaction on a corpus of chat lines, domain identifiers surviving, batching, user-id hashing, the salt."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from continuous_learning.capture import privacy, recognizers, spans
from continuous_learning.capture.privacy import Sanitized, get_sanitizer
from continuous_learning.core.errors import ConfigError
from continuous_learning.core.settings import PrivacyConfig

REPO = Path(__file__).resolve().parents[1]
CORPUS = [
    json.loads(line)
    for line in (Path(__file__).parent / "data" / "pii_corpus.jsonl").read_text(encoding="utf-8").splitlines()
    if line.strip()
]
IDS = [f"line{i + 1}" for i in range(len(CORPUS))]
# The entities pii_corpus.jsonl was written for; the later ones are measured on the corpora in test_redaction.py.
PRESIDIO_ERA_ENTITIES = ["EMAIL_ADDRESS", "PHONE_NUMBER", "US_SSN", "CREDIT_CARD", "IBAN_CODE", "IP_ADDRESS", "PERSON"]


@pytest.fixture(scope="module")
def sanitizer() -> privacy.Sanitizer:
    return get_sanitizer(PrivacyConfig()).load()


@pytest.fixture(scope="module")
def corpus_out(sanitizer: privacy.Sanitizer) -> list[Sanitized]:
    return sanitizer.sanitize_many([row["text"] for row in CORPUS])


def _digits(value: str) -> str:
    return re.sub(r"\D", "", value)


# --- the corpus itself ----------------------------------------------------------------------------------------


def test_corpus_covers_every_default_entity_in_several_formats() -> None:
    assert len(CORPUS) >= 40
    counts = {entity: sum(entity in row["entities"] for row in CORPUS) for entity in PRESIDIO_ERA_ENTITIES}
    assert all(n >= 3 for n in counts.values()), counts
    assert sum(not row["pii"] for row in CORPUS) >= 5
    for row in CORPUS:
        assert all(value in row["text"] for value in row["pii"] + row["keep"]), row


# --- redaction ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("index", range(len(CORPUS)), ids=IDS)
def test_no_raw_pii_remains(index: int, corpus_out: list[Sanitized]) -> None:
    row, out = CORPUS[index], corpus_out[index]
    for value in row["pii"]:
        assert value not in out.text, f"{value!r} leaked: {out.text!r}"
        if len(_digits(value)) >= 7:  # phones, cards, SSNs, IBANs: also with separators stripped
            assert _digits(value) not in _digits(out.text), f"{value!r} leaked as digits: {out.text!r}"


@pytest.mark.parametrize("index", range(len(CORPUS)), ids=IDS)
def test_domain_identifiers_survive(index: int, corpus_out: list[Sanitized]) -> None:
    row, out = CORPUS[index], corpus_out[index]
    for value in row["keep"]:
        assert value in out.text, f"{value!r} was altered: {out.text!r}"


@pytest.mark.parametrize("index", range(len(CORPUS)), ids=IDS)
def test_entity_types_reported(index: int, corpus_out: list[Sanitized]) -> None:
    row, out = CORPUS[index], corpus_out[index]
    assert out.entities == row["entities"], out.text
    for entity in out.entities:
        assert f"<{entity}>" in out.text


def test_texts_without_pii_come_back_unchanged(corpus_out: list[Sanitized]) -> None:
    clean = [(row, out) for row, out in zip(CORPUS, corpus_out) if not row["pii"]]
    assert clean
    for row, out in clean:
        assert out == Sanitized(row["text"], [], False)


@pytest.mark.parametrize(
    "text",
    [
        "Ship to ZIP 94107-1234 by Friday.",
        "Due 3/11/2026 or 11/23/2026 at the latest; we produced 1,234,567 units.",
        "Paint it RAL 9010, use M8x1.25 bolts, keep pH 7.4 for 10-15 minutes.",
        "Between 2026-11-23 and 2026-12-01 the line is down; see ticket #4521.",
        "Part no. PX-3301 and batch 240118 failed; serial 123456789 replaced it.",
        "Temperature 180°C, pressure 2.5 bar, 3600 rpm, firmware v2.4.1 build 1.0.0.",
        "Call Customer Service if batch B-204 is late; Dear Hiring Manager, thanks.",
    ],
)
def test_identifier_heavy_text_is_left_alone(text: str, sanitizer: privacy.Sanitizer) -> None:
    assert sanitizer.sanitize(text) == Sanitized(text, [], False)


def test_empty_input(sanitizer: privacy.Sanitizer) -> None:
    assert sanitizer.sanitize("") == Sanitized("", [], False)
    assert sanitizer.sanitize_many([]) == []


def test_overlapping_detections_become_one_placeholder(sanitizer: privacy.Sanitizer) -> None:
    # Phone and card recognizers also fire on digit groups inside the IBAN.
    out = sanitizer.sanitize("Send it to DE89 3704 0044 0532 0130 00 today.")
    assert out == Sanitized("Send it to <IBAN_CODE> today.", ["IBAN_CODE"], False)


def test_overlapping_detections_merge_into_one_span_of_the_best_kind() -> None:
    span = spans.Span
    kept = spans.resolve_overlaps(
        [span("PHONE_NUMBER", 0, 10, 0.5), span("CREDIT_CARD", 2, 20, 1.0), span("PERSON", 25, 30, 0.85),
         span("PERSON", 25, 35, 0.85), span("IP_ADDRESS", 40, 45, 0.6), span("NATIONAL_ID", 50, 61, 0.9),
         span("US_SSN", 50, 61, 0.6)]
    )
    assert kept == [span("CREDIT_CARD", 0, 20, 1.0), span("PERSON", 25, 35, 0.85), span("IP_ADDRESS", 40, 45, 0.6),
                    span("US_SSN", 50, 61, 0.6)]


def test_weak_evidence_flags_without_redacting(sanitizer: privacy.Sanitizer) -> None:
    text = "The reading was 401567321 at noon."  # SSN-shaped, but no SSN context
    assert sanitizer.sanitize(text) == Sanitized(text, [], True)
    strict = get_sanitizer(PrivacyConfig(score_threshold=0.65))
    text = "Old value 555-123-4567 from Lot A-17."  # phone (0.5-0.6) without context words
    assert strict.sanitize(text) == Sanitized(text, [], True)
    assert sanitizer.sanitize(text).text == "Old value <PHONE_NUMBER> from Lot A-17."


def test_batching_matches_one_by_one(sanitizer: privacy.Sanitizer, corpus_out: list[Sanitized]) -> None:
    assert [sanitizer.sanitize(row["text"]) for row in CORPUS] == corpus_out
    mixed = ["", CORPUS[0]["text"], "", "no pii here"]
    assert sanitizer.sanitize_many(mixed) == [sanitizer.sanitize(text) for text in mixed]


def test_entities_come_from_config() -> None:
    only_email = get_sanitizer(PrivacyConfig(entities=["EMAIL_ADDRESS"]))
    out = only_email.sanitize("John Smith: john@example.com, 555-123-4567")
    assert out == Sanitized("John Smith: <EMAIL_ADDRESS>, 555-123-4567", ["EMAIL_ADDRESS"], False)
    with pytest.raises(ConfigError, match="NOT_AN_ENTITY"):
        privacy.Sanitizer(PrivacyConfig(entities=["NOT_AN_ENTITY"])).sanitize("hello")


def test_get_sanitizer_caches_per_config() -> None:
    assert get_sanitizer(PrivacyConfig()) is get_sanitizer(PrivacyConfig())
    assert get_sanitizer(PrivacyConfig()) is not get_sanitizer(PrivacyConfig(score_threshold=0.5))


@pytest.mark.parametrize("address", ["dana.whitfield@northwind-fab.example", "ops@plant.internal", "a.b@x.corp",
                                     "team+alerts@build.local"])
def test_emails_on_internal_domains_are_redacted(address: str, sanitizer: privacy.Sanitizer) -> None:
    """Internal top-level domains are not on the public suffix list Presidio's recognizer checks."""
    assert sanitizer.sanitize(f"send the notice to {address} today").text == "send the notice to <EMAIL_ADDRESS> today"


@pytest.mark.parametrize("text, kept", [
    ("The members' newsletter is called The Quire.", True),
    ("The project is named Bluefin.", True),
    ("Our intern is called Tendai.", False),
    ("The new hire is called Maria Lopez.", False),
])
def test_a_thing_that_is_called_something_keeps_its_name(text: str, kept: bool, sanitizer: privacy.Sanitizer) -> None:
    """"<thing> is called X" names a product or a project (facts worth learning); a person subject, or a listed
    first name, still means a person."""
    assert (sanitizer.sanitize(text).text == text) is kept


# --- no network, cheap import ---------------------------------------------------------------------------------


def test_email_check_never_touches_the_network(monkeypatch: pytest.MonkeyPatch, sanitizer: privacy.Sanitizer) -> None:
    attempts: list[tuple] = []

    def refuse(*args: object, **kwargs: object) -> None:
        attempts.append(args)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    extract = recognizers.offline_tld_extractor()  # fresh instance: nothing loaded yet
    assert extract("ops@mail.example.co.uk").suffix == "co.uk"
    assert sanitizer.sanitize("mail ops@plant.example.de").text == "mail <EMAIL_ADDRESS>"
    assert attempts == []


_IMPORT_CHECK = """
import os, sys
import continuous_learning.capture.privacy as privacy
heavy = [m for m in ("presidio_analyzer", "presidio_anonymizer", "spacy", "torch", "tldextract") if m in sys.modules]
assert not heavy, heavy

# Pretend to be a GPU box: stock presidio would allocate a CUDA tensor while being imported.
import torch
cuda_allocations = []
real_tensor = torch.tensor
def tensor(*args, **kwargs):
    if kwargs.get("device") == "cuda":
        cuda_allocations.append(args)
        raise RuntimeError("no GPU in this test")
    return real_tensor(*args, **kwargs)
torch.cuda.is_available = lambda: True
torch.tensor = tensor
from continuous_learning.capture import recognizers
recognizers.import_presidio_on_cpu()
assert cuda_allocations == [], cuda_allocations
assert "PRESIDIO_DEVICE" not in os.environ
"""


def test_import_is_cheap_and_loading_never_touches_cuda() -> None:
    env = {k: v for k, v in os.environ.items() if k != "PRESIDIO_DEVICE"}
    subprocess.run([sys.executable, "-c", _IMPORT_CHECK], cwd=REPO, env=env, check=True, timeout=120)


# The user-id hash and the salt are tested in test_keys.py (keys.py owns them now).
