"""Opt-in encryption at rest of interaction texts (CL_ENCRYPTION_KEY, Fernet)."""
from __future__ import annotations

import orjson
import pytest
from cryptography.fernet import Fernet
from typer.testing import CliRunner

from continuous_learning import cli, registry
from continuous_learning.capture.ingest import Recorder, Turn, find_interaction, iter_interactions
from continuous_learning.core.errors import CLError
from continuous_learning.core.records import Feedback
from continuous_learning.core.settings import load_settings
from continuous_learning.evaluate import load_messages_file
from continuous_learning.storage import crypto
from continuous_learning.train import load_examples

SECRETS = [f"zebra-cobalt-{n} manifests the quokka lighthouse" for n in range(6)]
ANSWERS = [f"Marmalade-{n} orbit answer with saffron" for n in range(6)]
CORRECTION = "Tangerine-correction about the quokka lighthouse"


def invoke(*args: str):
    return CliRunner().invoke(cli.app, list(args))


def ingest(settings, prompts, answers, user="alice"):
    turns = [Turn(messages=[{"role": "user", "content": p}, {"role": "assistant", "content": a}], user_id=user,
                  feedback=Feedback(score=5), target_tool=f"tool{n}") for n, (p, a) in enumerate(zip(prompts, answers))]
    return Recorder(settings).record_turns(turns)


def snapshot_files(settings) -> list:
    doc = registry.load(settings)
    return [settings.home / s[k] for s in doc["snapshots"] for k in ("file", "eval_file")]


@pytest.fixture
def key(monkeypatch) -> str:
    value = Fernet.generate_key().decode()
    monkeypatch.setenv(crypto.ENV_KEY, value)
    return value


def test_texts_are_sealed_in_the_log_and_snapshots_and_read_back(workspace, key):
    settings = load_settings()
    interactions = ingest(settings, SECRETS, ANSWERS)
    Recorder(settings).record_feedback(interactions[0], Feedback(correction=CORRECTION, comment="Pistachio comment"),
                                       user_id="alice")
    raw = settings.raw_log.read_bytes()
    for text in [*SECRETS, *ANSWERS, CORRECTION, "Pistachio", "zebra", "Tangerine"]:
        assert text.encode() not in raw
    assert crypto.MARKER.encode() in raw
    assert interactions[0].user_hash.encode() in raw  # ids and hashes stay in clear

    found = find_interaction(settings, interactions[0].id)
    assert found.prompt == SECRETS[0] and found.feedback.correction == CORRECTION
    assert [i.prompt for i in iter_interactions(settings)] == SECRETS

    result = invoke("curate")
    assert result.exit_code == 0, result.output
    files = snapshot_files(settings)
    assert files
    for path in files:
        data = path.read_bytes()
        assert b"zebra" not in data and b"Marmalade" not in data and b"Tangerine" not in data
    train_path, eval_path = files
    rows, unreadable = load_examples(train_path)
    texts = {m["content"] for r in rows for m in r["messages"]} | {
        m["content"] for c in load_messages_file(eval_path) for m in c}
    assert unreadable == 0
    assert CORRECTION in texts and {*SECRETS[1:]} <= texts
    pair = next(r for r in rows + [orjson.loads(line) for line in eval_path.read_bytes().splitlines()]
                if r["messages"][-1]["content"] == CORRECTION or "rejected" in r)
    assert pair["rejected"][0]["content"] == ANSWERS[0] or crypto.is_sealed(pair["rejected"][0]["content"])

    exported = [orjson.loads(line) for line in invoke("export", "--user", "alice").output.splitlines()]
    contents = {m["content"] for e in exported for m in e["record"].get("messages", [])}
    assert SECRETS[0] in contents and ANSWERS[0] in contents
    assert any(e["category"] == "feedback" and e["record"]["feedback"]["correction"] == CORRECTION for e in exported)
    assert not any(crypto.is_sealed(c) for c in contents)

    # a second curate replays earlier (sealed) examples transparently
    ingest(settings, [s.replace("zebra", "yak") for s in SECRETS], ANSWERS)
    assert invoke("curate").exit_code == 0
    assert b"yak-cobalt" not in settings.raw_log.read_bytes()


@pytest.mark.parametrize("bad", ["missing", "wrong"])
def test_wrong_or_missing_key_is_one_clear_error(workspace, key, monkeypatch, bad):
    settings = load_settings()
    ingest(settings, SECRETS, ANSWERS)
    if bad == "missing":
        monkeypatch.delenv(crypto.ENV_KEY)
    else:
        monkeypatch.setenv(crypto.ENV_KEY, Fernet.generate_key().decode())
    before = sorted(p.name for p in settings.curated_dir.glob("*")) if settings.curated_dir.exists() else []
    result = invoke("curate")
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot decrypt" in lines[0] and "CL_ENCRYPTION_KEY" in lines[0], result.output
    assert "Traceback" not in result.output
    after = sorted(p.name for p in settings.curated_dir.glob("*")) if settings.curated_dir.exists() else []
    assert after == before
    assert registry.load(settings)["snapshots"] == []
    with pytest.raises(CLError, match="wrong or missing CL_ENCRYPTION_KEY"):
        list(iter_interactions(settings))


def test_invalid_key_is_a_clear_error(workspace, monkeypatch):
    monkeypatch.setenv(crypto.ENV_KEY, "not-a-fernet-key")
    result = invoke("curate")
    assert result.exit_code != 0 and "not a valid Fernet key" in result.output and "Traceback" not in result.output


def test_old_plaintext_and_new_encrypted_lines_both_read(workspace, monkeypatch):
    settings = load_settings()
    ingest(settings, SECRETS[:3], ANSWERS[:3])  # written before encryption was turned on
    monkeypatch.setenv(crypto.ENV_KEY, Fernet.generate_key().decode())
    ingest(settings, SECRETS[3:], ANSWERS[3:])
    raw = settings.raw_log.read_bytes()
    assert SECRETS[0].encode() in raw and SECRETS[4].encode() not in raw
    assert [i.prompt for i in iter_interactions(settings)] == SECRETS
    assert invoke("curate").exit_code == 0
    rows = [r for path in snapshot_files(settings) for r in load_examples(path)[0]]
    assert {r["messages"][0]["content"] for r in rows} == set(SECRETS)


def test_helpers_pass_plain_text_through():
    cipher = crypto.Cipher(Fernet.generate_key().decode())
    sealed = crypto.encrypt_text(cipher, "hello")
    assert crypto.is_sealed(sealed) and crypto.decrypt_text(cipher, sealed) == "hello"
    assert crypto.decrypt_text(None, "plain") == "plain"
    assert crypto.cipher_from_env({}) is None
    record = {"id": "x", "messages": [{"role": "user", "content": "hi"}], "feedback": {"score": 3, "comment": "ok"}}
    sealed_record = crypto.seal_messages(record, cipher)
    assert sealed_record["id"] == "x" and sealed_record["feedback"]["score"] == 3
    assert crypto.open_messages(sealed_record, cipher) == record
    with pytest.raises(CLError):
        crypto.open_messages(sealed_record, crypto.Cipher(Fernet.generate_key().decode()))
