"""Secrets and personal data measured on the labelled corpora (tuning, dev, held-out) and the issue's examples, and
domain identifiers that must survive. The targets are the issue's: 0 structured values leaked, names <= 10%."""
from __future__ import annotations

import pytest

from bench import privacy_eval
from continuous_learning.capture.privacy import get_sanitizer
from continuous_learning.core.settings import PrivacyConfig


@pytest.fixture(scope="module")
def sanitizer():
    return get_sanitizer(PrivacyConfig()).load()


def measure(sanitizer, path) -> dict:
    rows = privacy_eval.load(path)
    return privacy_eval.evaluate(rows, [s.text for s in sanitizer.sanitize_many([r["text"] for r in rows])])


@pytest.mark.parametrize("path", [privacy_eval.TUNING, privacy_eval.DEV, privacy_eval.HELDOUT], ids=lambda p: p.stem)
def test_corpus_meets_the_targets(sanitizer, path) -> None:
    result = measure(sanitizer, path)
    summary = privacy_eval.summary(result)
    leaks = {kind: v["missed"] for kind, v in result["recall"].items() if kind != "PERSON" and v["leaked"]}
    assert summary["structured_leaked"] == 0, leaks
    assert summary["names_leak_rate"] <= 0.10, result["recall"]["PERSON"]["missed"]


def test_corpora_cover_every_kind_and_differ() -> None:
    kinds = {"API_KEY", "ACCESS_TOKEN", "PRIVATE_KEY", "PASSWORD", "SECRET", "EMAIL_ADDRESS", "PHONE_NUMBER", "US_SSN",
             "CREDIT_CARD", "IBAN_CODE", "IP_ADDRESS", "STREET_ADDRESS", "DATE_OF_BIRTH", "PASSPORT", "NATIONAL_ID",
             "PERSON"}
    texts = {}
    for path in (privacy_eval.TUNING, privacy_eval.DEV, privacy_eval.HELDOUT):
        rows = privacy_eval.load(path)
        assert {v["kind"] for r in rows for v in r["values"]} == kinds, path.stem
        texts[path.stem] = {r["text"] for r in rows}
    assert not texts["privacy_heldout"] & (texts["privacy_tuning"] | texts["privacy_dev"])


def test_domain_identifiers_survive(sanitizer) -> None:
    result = measure(sanitizer, privacy_eval.DOMAIN)
    assert result["keep"] >= 1000 and result["survival"] >= 0.95, result["precision"]


ISSUE_EXAMPLES = [
    ("AKIAIOSFODNN7EXAMPLE with wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", ["AKIAIOSFODNN7EXAMPLE",
                                                                           "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"]),
    ("key sk-proj-4f9XkLmN0pQrStUvWxYzAbCdEfGhIjKl1234", ["sk-proj-4f9XkLmN0pQrStUvWxYzAbCdEfGhIjKl1234"]),
    ("ghp_aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789", ["ghp_aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789"]),
    ("github_pat_11AAAAAAA0aaaaaaaaaaaa_bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb",
     ["github_pat_11AAAAAAA0aaaaaaaaaaaa_bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"]),
    ("xoxb-2048-4096-AbCdEfGhIjKlMnOp", ["xoxb-2048-4096-AbCdEfGhIjKlMnOp"]),
    ("hf_AbCdEfGhIjKlMnOpQrStUvWxYz123456", ["hf_AbCdEfGhIjKlMnOpQrStUvWxYz123456"]),
    ("sk_live_4eC39HqLyjWDarjtT1zdp7dc", ["sk_live_4eC39HqLyjWDarjtT1zdp7dc"]),
    ("AIzaSyDaGmWKa4JsXZ-HjGw7ISLn_3namBGewQe", ["AIzaSyDaGmWKa4JsXZ-HjGw7ISLn_3namBGewQe"]),
    ("token eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
     ["eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"]),
    ("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmU\nAAAAEbm9uZQAAAAAAAAAB\n"
     "-----END OPENSSH PRIVATE KEY-----",
     ["b3BlbnNzaC1rZXktdjEAAAAABG5vbmU", "AAAAEbm9uZQAAAAAAAAAB", "BEGIN OPENSSH"]),
    ("mysql://root:toor@localhost/db", ["toor"]),
    ("https://deploy:Pa55w0rd!@git.example.com/x.git", ["Pa55w0rd!"]),
    ("password=s3cr3t-value", ["s3cr3t-value"]),
    ("password: Winter2025", ["Winter2025"]),
    ("export DB_PASSWORD='q7!Lm#x2'", ["q7!Lm#x2"]),
    ("Authorization: Bearer abcDEF123456ghiJKL789", ["abcDEF123456ghiJKL789"]),
    ("the wifi password is hunter22", ["hunter22"]),
    ("my pin is 4821", ["4821"]),
    ("my name is john smith", ["john", "smith"]),
    ("MY NAME IS JOHN SMITH", ["JOHN", "SMITH"]),
    ("Olumide Adeyemi approved it.", ["Olumide", "Adeyemi"]),
    ("I asked olumide adeyemi to check.", ["olumide", "adeyemi"]),
    ("김민준 checked the press.", ["김민준"]),
    ("Иван Петров signed the report.", ["Иван", "Петров"]),
    ("I live at 742 Evergreen Terrace, Springfield.", ["742 Evergreen Terrace"]),
    ("born on 1985-04-12", ["1985-04-12"]),
    ("passport number K4821977", ["K4821977"]),
    ("iban de89 3704 0044 0532 0130 00", ["de89 3704 0044 0532 0130 00"]),
    ("reach me on my direct line 2125550199", ["2125550199"]),
    ("call630-596-1111", ["630-596-1111"]),
]


@pytest.mark.parametrize("text,values", ISSUE_EXAMPLES, ids=[t[:24] for t, _ in ISSUE_EXAMPLES])
def test_issue_examples_leave_nothing(sanitizer, text, values) -> None:
    out = sanitizer.sanitize(text)
    for value in values:
        assert value not in out.text, out.text
    assert out.entities


@pytest.mark.parametrize("text", [
    "Lot A-17 was produced on 2026-03-14 with part PX-3301 for ORD-2026-0042 (firmware v2.3.1).",
    "serial 123456789, torque 45 Nm, PO 4500012345, job 8812, line 3",
    "set max_tokens=512 and token_limit=4096; the password reset link expired",
    "The password is wrong, please reset it. Pin 12 on the header is loose.",
    "commit 3f2a9c1b7e4d5a6b8c9d0e1f2a3b4c5d6e7f8a9b fixed the build",
    "I serve SmolLM2-135M-Instruct locally and compare it with Mistral-7B-Instruct-v0.3.",
])
def test_domain_text_is_left_alone(sanitizer, text) -> None:
    assert sanitizer.sanitize(text).text == text


def test_secret_kinds_are_reported_and_typed(sanitizer) -> None:
    out = sanitizer.sanitize("export DB_PASSWORD='q7!Lm#x2' and ghp_aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789")
    assert out.text == "export DB_PASSWORD='<PASSWORD>' and <API_KEY>"
    assert out.entities == ["API_KEY", "PASSWORD"]
