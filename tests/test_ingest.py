"""`cl ingest`, `cl feedback`, settings precedence, and the promise that raw PII never touches the disk."""
from __future__ import annotations

import json
from pathlib import Path

import orjson
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from typer.testing import CliRunner

from continuous_learning import cli
from continuous_learning.capture.ingest import find_interaction, parse_ingest_line
from continuous_learning.core.errors import ConfigError, InputError
from continuous_learning.core.settings import load_settings
from continuous_learning.storage.store import iter_jsonl

CORPUS = Path(__file__).parent / "data" / "pii_corpus.jsonl"


def records(path: Path) -> list[dict]:
    return [r for _, r in iter_jsonl(path)]


def write_lines(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def invoke(*args: str, **kwargs):
    return CliRunner().invoke(cli.app, list(args), **kwargs)


def test_ingest_good_and_bad_lines(workspace, tmp_path):
    good = [
        orjson.dumps({"prompt": "Where is lot A-17?", "response": "In bay 3.", "feedback": {"score": 5},
                      "user_id": "u1",
                      "target_tool": "warehouse", "language": "en", "created_at": "2026-01-02T03:04:05Z"}),
        orjson.dumps({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                   {"role": "assistant", "content": "Hello!"}], "feedback": {"helpful": False},
                      "correction": "Hello, how can I help?"}),
    ]
    bad = [
        b"{not json",
        b'{"prompt": "\xff\xfe bad utf-8", "response": "x"}',
        orjson.dumps({"prompt": 42, "response": "x"}),
        orjson.dumps({"prompt": "   ", "response": "x"}),
        orjson.dumps({"prompt": "q", "response": "a", "feedback": {"score": 9}}),
        orjson.dumps({"messages": [{"role": "user", "content": "only a question"}]}),
        orjson.dumps(["a", "list"]),
        orjson.dumps({"prompt": "x" * 30_000, "response": "too long"}),
        b'{"prompt": "' + b"y" * 2_000_000 + b'", "response": "huge line"}',
        orjson.dumps({"prompt": "q", "response": "a", "created_at": "yesterday"}),
    ]
    source = write_lines(tmp_path / "other_app.jsonl", good[:1] + bad + good[1:])
    result = invoke("ingest", str(source))
    assert result.exit_code == 3
    assert "imported 2 interaction(s)" in result.output
    for number in range(2, 12):
        assert f"skipped line {number}:" in result.output
    assert "Traceback" not in result.output
    stored = records(workspace / "data" / "ingestion" / "raw_interactions.jsonl")
    assert len(stored) == 2
    first, second = stored
    assert first["messages"] == [{"role": "user", "content": "Where is lot A-17?"},
                                 {"role": "assistant", "content": "In bay 3."}]
    assert first["feedback"] == {"score": 5} and first["target_tool"] == "warehouse" and first["language"] == "en"
    assert first["created_at"] == "2026-01-02T03:04:05Z" and first["source"] == "ingest"
    assert first["user_hash"] not in (None, "u1")
    assert second["feedback"] == {"helpful": False, "correction": "Hello, how can I help?"}
    assert second["user_hash"] is None

    clean = write_lines(tmp_path / "clean.jsonl", good)
    result = invoke("ingest", str(clean), "--json")
    assert result.exit_code == 0 and orjson.loads(result.output) == {"imported": 2, "skipped": []}


def test_control_characters_are_removed(workspace, tmp_path):
    source = write_lines(tmp_path / "ctl.jsonl", [orjson.dumps({"prompt": "nul\u0000 and bell\u0007 here",
                                                                "response": "ok\ttab"})])
    assert invoke("ingest", str(source)).exit_code == 0
    (stored,) = records(workspace / "data" / "ingestion" / "raw_interactions.jsonl")
    assert stored["messages"][0]["content"] == "nul and bell here" and stored["messages"][1]["content"] == "ok\ttab"


def test_missing_file_is_one_line(workspace):
    result = invoke("ingest", "nope.jsonl")
    assert result.exit_code == 2 and "no such file" in result.output and "Traceback" not in result.output


@given(st.binary(max_size=300))
@hsettings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
def test_parser_never_crashes_on_arbitrary_bytes(raw):
    try:
        turn = parse_ingest_line(raw, max_chars=1000)
    except InputError as exc:
        assert exc.message
    else:
        assert turn.messages[-1]["role"] == "assistant"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=10), children, max_size=3),
    max_leaves=10,
)


@given(st.fixed_dictionaries({}, optional={
    "prompt": json_values, "response": json_values, "messages": json_values, "feedback": json_values,
    "user_id": json_values, "created_at": json_values, "correction": json_values, "target_tool": json_values,
}))
@hsettings(max_examples=300, deadline=None)
def test_parser_accepts_or_rejects_structured_junk_cleanly(data):
    try:
        turn = parse_ingest_line(json.dumps(data).encode(), max_chars=1000)
    except InputError:
        return
    assert all(isinstance(m["content"], str) and m["content"].strip() for m in turn.messages)


def test_late_feedback_is_an_event_line(workspace, tmp_path):
    source = write_lines(tmp_path / "a.jsonl", [orjson.dumps({"prompt": "What is part PX-1?", "response": "A bolt."})])
    assert invoke("ingest", str(source)).exit_code == 0
    log = workspace / "data" / "ingestion" / "raw_interactions.jsonl"
    (turn,) = records(log)
    result = invoke("feedback", turn["id"], "--score", "2", "--correction", "A hex bolt, M8. Mail bob@example.com",
                    "--comment", "close")
    assert result.exit_code == 0, result.output
    interaction_line, event = records(log)
    assert interaction_line == turn  # never rewritten
    assert event["type"] == "feedback" and event["interaction_id"] == turn["id"]
    assert event["feedback"]["score"] == 2 and "bob@example.com" not in event["feedback"]["correction"]
    merged = find_interaction(load_settings(), turn["id"])
    assert merged.feedback.score == 2 and merged.feedback.comment == "close"
    counters = orjson.loads((workspace / "logs" / "feedback_metrics.json").read_bytes())["total"]
    assert counters["skipped"] == 0 and counters["corrected"] == 1 and counters["turns"] == 1

    assert invoke("feedback", "no-such-id", "--score", "5").exit_code == 2
    assert invoke("feedback", turn["id"], "--score", "7").exit_code != 0
    assert invoke("feedback", turn["id"]).exit_code == 1
    assert len(records(log)) == 2


def test_no_raw_pii_anywhere_under_the_workspace(workspace, tmp_path):
    corpus = [orjson.loads(line) for line in CORPUS.read_bytes().splitlines() if line.strip()]
    lines = []
    for i, item in enumerate(corpus):
        lines.append(orjson.dumps({"prompt": item["text"], "response": f"Noted: {item['text']}",
                                   "user_id": f"user{i}@example.org",
                                   "feedback": {"score": 5}, "correction": f"I will contact you. {item['text']}"}))
    assert invoke("ingest", str(write_lines(tmp_path / "pii.jsonl", lines))).exit_code == 0
    stored = records(workspace / "data" / "ingestion" / "raw_interactions.jsonl")
    assert len(stored) == len(corpus)
    blob = b"".join(p.read_bytes() for p in workspace.rglob("*") if p.is_file())
    for i, item in enumerate(corpus):
        for value in item["pii"]:
            assert value.encode() not in blob, value
        assert f"user{i}@example.org".encode() not in blob
    for item, record in zip(corpus, stored):
        for keep in item.get("keep", []):
            assert keep in record["messages"][0]["content"], (keep, record["messages"][0]["content"])
        if item["pii"]:
            assert record["pii_entities"], item["text"]


def test_settings_precedence_and_validation(tmp_path):
    (tmp_path / "cl.toml").write_text('[train]\nlearning_rate = 0.001\nmax_steps = 10\n[chat]\nsystem_prompt = '
                                      '"toml"\n')
    s = load_settings(home=tmp_path, env={"CL_TRAIN_MAX_STEPS": "20"}, overrides={"chat": {"system_prompt": "flag"}})
    assert s.train.learning_rate == 0.001 and s.train.max_steps == 20 and s.chat.system_prompt == "flag"
    assert s.raw_log == tmp_path.resolve() / "data" / "ingestion" / "raw_interactions.jsonl"
    (tmp_path / "cl.toml").write_text("[train]\nlearning_rat = 0.1\n")
    with pytest.raises(ConfigError, match="unknown setting 'train.learning_rat'"):
        load_settings(home=tmp_path, env={})
    (tmp_path / "cl.toml").write_text('[train]\nmax_steps = "many"\n')
    with pytest.raises(ConfigError, match="train.max_steps"):
        load_settings(home=tmp_path, env={})
    with pytest.raises(ConfigError):
        load_settings(home=tmp_path / "x", env={"CL_CURATE_EVAL_FRACTION": "lots"})


def test_bad_config_via_cli_is_one_line(workspace):
    (workspace / "cl.toml").write_text("[nonsense]\nx = 1\n")
    result = invoke("config")
    assert result.exit_code == 2 and "unknown section [nonsense]" in result.output and "Traceback" not in result.output


def test_knowledge_command(workspace, tmp_path):
    source = write_lines(tmp_path / "k.jsonl", [
        orjson.dumps({"prompt": "Lot A-17 and lot a-17 again", "response": "Batch B-204 is fine."}),
        orjson.dumps({"prompt": "What about LOT A-17?", "response": "Held."}),
    ])
    assert invoke("ingest", str(source)).exit_code == 0
    facts = orjson.loads(invoke("knowledge", "--json").output)
    counts = {f["fact"]: f["count"] for f in facts}
    assert counts == {"LOT A-17": 2, "BATCH B-204": 1}
