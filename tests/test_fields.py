"""Every stored field is sanitized or validated: ids, labels, flags and text limits through `cl ingest`,
`cl feedback` and the Recorder; a damaged knowledge.json never turns a stored turn into a reported failure."""
from __future__ import annotations

import re
from pathlib import Path

import orjson
import pytest
from typer.testing import CliRunner

from continuous_learning import cli
from continuous_learning.capture import fields
from continuous_learning.capture.ingest import Recorder, Turn
from continuous_learning.core.errors import InputError
from continuous_learning.core.records import Feedback
from continuous_learning.core.settings import PrivacyConfig, load_settings
from continuous_learning.storage.store import iter_jsonl


def invoke(*args: str):
    return CliRunner().invoke(cli.app, list(args))


def ingest_lines(tmp_path: Path, rows: list[dict]):
    source = tmp_path / "other.jsonl"
    source.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    return invoke("ingest", str(source))


def workspace_blob(workspace: Path) -> bytes:
    return b"".join(p.read_bytes() for p in workspace.rglob("*") if p.is_file())


# What the workspace writes by itself: ids, hashes and salts (hex, uuids) and timestamps. A short secret such as a
# four-digit PIN turns up inside them by chance (a random uuid held "5695" once).
MACHINE_MADE = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|[0-9a-f]{16,}"
                          rb"|\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d+)?Z?")


def stored_outside_machine_made(value: bytes, blob: bytes) -> bool:
    """Whether `value` occurs in `blob` anywhere but inside an id, hash or timestamp the workspace made."""
    inside = [(m.start(), m.end()) for m in MACHINE_MADE.finditer(blob)]
    for hit in re.finditer(re.escape(value), blob):
        if not any(start <= hit.start() and hit.end() <= end for start, end in inside):
            return True
    return False


def log_records(workspace: Path) -> list[dict]:
    return [r for _, r in iter_jsonl(workspace / "data" / "ingestion" / "raw_interactions.jsonl")]


BASE = {"prompt": "Where is lot A-17?", "response": "In bay 3."}


def test_personal_session_ids_are_stored_as_hashes(workspace, tmp_path) -> None:
    rows = [{**BASE, "session_id": "alice.smith@example.com-laptop"},
            {**BASE, "session_id": "alice.smith@example.com-laptop"},
            {**BASE, "session_id": "john-smith-desktop"}, {**BASE, "session_id": "s" * 80},
            {**BASE, "session_id": "run-42"}]
    result = ingest_lines(tmp_path, rows)
    assert result.exit_code == 0, result.output
    stored = [r["session_id"] for r in log_records(workspace)]
    assert stored[0] == stored[1] and all(s.startswith("h-") for s in stored[:4])
    assert stored[4] == "run-42"
    blob = workspace_blob(workspace)
    for raw in (b"alice.smith", b"example.com", b"john-smith", b"s" * 80):
        assert raw not in blob


def test_bad_labels_and_flags_skip_the_line_with_one_reason_each(workspace, tmp_path) -> None:
    rows = [
        {**BASE, "target_tool": "John Smith 555-123-4567"},
        {**BASE, "language": "my email is bob@example.org"},
        {**BASE, "model": "x" * 200},
        {**BASE, "feedback": {"private": "call me at 555-987-6543"}},
        {**BASE, "feedback": {"helpful": "yes"}},
        {**BASE, "feedback": {"comment": "c" * 3000}},
        {**BASE, "correction": "y" * 30_000},
        {**BASE, "target_tool": ["a", "list"]},
        {**BASE, "target_tool": "Visual Studio Code", "language": "de-DE", "model": "Qwen/Qwen2.5-0.5B-Instruct",
         "feedback": {"private": True, "comment": "fine"}},
    ]
    result = ingest_lines(tmp_path, rows)
    assert result.exit_code == 3 and "imported 1 interaction(s)" in result.output and "Traceback" not in result.output
    for number, reason in [(1, "'target_tool' looks like personal data"), (2, "'language' must be a short label"),
                           (3, "'model' is longer than"), (4, "'private' must be true or false"),
                           (5, "'helpful' must be true or false"), (6, "'comment' is longer than 2000"),
                           (7, "'correction' is longer than 20000"), (8, "'target_tool' must be a string")]:
        assert f"skipped line {number}: {reason}" in result.output, result.output
    (stored,) = log_records(workspace)
    assert stored["target_tool"] == "Visual Studio Code" and stored["language"] == "de-DE"
    assert stored["feedback"] == {"private": True, "comment": "fine"}
    blob = workspace_blob(workspace)
    for raw in (b"John Smith", b"555-123-4567", b"bob@example.org", b"555-987-6543"):
        assert raw not in blob


def test_feedback_command_enforces_the_comment_limit(workspace, tmp_path) -> None:
    assert ingest_lines(tmp_path, [BASE]).exit_code == 0
    (turn,) = log_records(workspace)
    result = invoke("feedback", turn["id"], "--comment", "z" * 2001)
    assert result.exit_code == 2 and "'comment' is longer than 2000 characters" in result.output
    assert invoke("feedback", turn["id"], "--comment", "z" * 2000).exit_code == 0
    assert len(log_records(workspace)) == 2


def test_limits_are_checkable_before_queueing() -> None:
    privacy = PrivacyConfig(max_comment_chars=10, max_text_chars=50)
    fields.check_feedback(Feedback(comment="short", private=True), privacy)
    with pytest.raises(InputError, match="'comment' is longer than 10"):
        fields.check_feedback(Feedback(comment="much too long"), privacy)
    with pytest.raises(InputError, match="'private' must be true or false"):
        fields.check_feedback(Feedback(private="call me at 555-123-4567"), privacy)
    turn = Turn(messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a" * 51}])
    with pytest.raises(InputError, match=r"'messages\[1\].content' is longer than 50"):
        fields.check_turn(turn, privacy)


def test_recorder_refuses_personal_labels_from_any_front_end(workspace) -> None:
    recorder = Recorder(load_settings())
    turn = Turn(messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                target_tool="John Smith 555-123-4567", source="api")
    with pytest.raises(InputError, match="target_tool"):
        recorder.record_turns([turn])
    assert not (workspace / "data" / "ingestion" / "raw_interactions.jsonl").exists()


def test_damaged_knowledge_file_does_not_fail_a_stored_turn(workspace, tmp_path) -> None:
    knowledge = workspace / "knowledge" / "knowledge.json"
    knowledge.parent.mkdir(parents=True, exist_ok=True)
    knowledge.write_text('{"facts": {"LOT A-17": {"count": "many"}}')  # not even valid JSON
    result = ingest_lines(tmp_path, [{"prompt": "Lot A-17 again?", "response": "Yes, lot A-17."}])
    assert result.exit_code == 0, result.output
    assert len(log_records(workspace)) == 1
    damaged = list(knowledge.parent.glob("knowledge.json.damaged-*"))
    assert len(damaged) == 1 and damaged[0].read_text().startswith('{"facts"')
    assert orjson.loads(knowledge.read_bytes())["facts"]["LOT A-17"]["count"] == 1


def test_wrongly_shaped_knowledge_file_is_moved_aside_too(workspace, tmp_path) -> None:
    knowledge = workspace / "knowledge" / "knowledge.json"
    knowledge.parent.mkdir(parents=True, exist_ok=True)
    knowledge.write_text('{"facts": {"LOT A-17": {"count": "many"}}}')
    assert invoke("knowledge").exit_code == 2
    assert ingest_lines(tmp_path, [{"prompt": "Lot A-17?", "response": "ok"}]).exit_code == 0
    assert orjson.loads(knowledge.read_bytes())["facts"]["LOT A-17"]["count"] == 1


def test_a_failing_update_after_the_append_only_warns(workspace, monkeypatch, caplog) -> None:
    from continuous_learning.capture import knowledge

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(knowledge, "record_facts", broken)
    recorder = Recorder(load_settings())
    turn = Turn(messages=[{"role": "user", "content": "lot A-17?"}, {"role": "assistant", "content": "ok"}])
    (stored,) = recorder.record_turns([turn])
    assert [r["id"] for r in log_records(workspace)] == [stored.id]
    assert "stored, but updating knowledge/counters failed (OSError: disk full)" in caplog.text
    event = recorder.record_feedback(stored, Feedback(correction="lot A-17 is in bay 4"))
    assert [r["id"] for r in log_records(workspace)] == [stored.id, event.id]


def test_secrets_never_reach_the_disk(workspace, tmp_path) -> None:
    from bench import privacy_eval

    rows = [r for r in privacy_eval.load(privacy_eval.HELDOUT) if r["values"] and r["values"][0]["kind"] != "PERSON"]
    lines = [{"prompt": r["text"], "response": "noted", "correction": f"ok: {r['text']}"} for r in rows]
    assert ingest_lines(tmp_path, lines).exit_code == 0
    blob = workspace_blob(workspace)
    for r in rows:
        for value in r["values"]:
            assert not stored_outside_machine_made(value["value"].encode(), blob), value
