"""The chat REPL: scripted sessions write the expected lines; ratings, corrections, commands, champion pick-up."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from rich.console import Console
from typer.testing import CliRunner

from continuous_learning import cli, registry
from continuous_learning.chat.models import ChatModel
from continuous_learning.chat.repl import ChatSession, parse_rating
from continuous_learning.storage.store import iter_jsonl

REPO = Path(__file__).resolve().parents[1]


def lines(path: Path) -> list[dict]:
    return [record for _, record in iter_jsonl(path)]


def scripted(inputs: list[str]):
    queue = list(inputs)

    def read(prompt: str) -> str:
        if not queue:
            raise EOFError
        return queue.pop(0)

    return read


@pytest.fixture(scope="module")
def tiny_chat_model(tiny_model_dir, tmp_path_factory):
    from continuous_learning.core.settings import load_settings

    env = {"CL_BASE_MODEL": str(tiny_model_dir)}
    return ChatModel.load(load_settings(home=tmp_path_factory.mktemp("unused"), env=env))


def run_session(settings, tiny_chat_model, inputs, **kwargs) -> str:
    console = Console(record=True, width=200)
    tiny_chat_model.use(None)
    session = ChatSession(settings, scripted(inputs), console, chat_model=tiny_chat_model, **kwargs)
    session.run()
    return console.export_text()


def test_parse_rating():
    assert parse_rating("y").feedback.helpful is True
    assert parse_rating("n too vague").feedback.comment == "too vague"
    assert parse_rating("5").feedback.score == 5 and parse_rating("5").feedback.helpful is True
    assert parse_rating("3").feedback.helpful is None
    assert parse_rating("").skipped
    assert parse_rating("c").feedback.correction == ""
    assert parse_rating("maybe") is None


def test_scripted_session_writes_one_line_per_turn(settings, tiny_chat_model):
    out = run_session(
        settings,
        tiny_chat_model,
        ["What is lot A-17?", "y", "And batch B-204?", "2 too vague", "Where is part PX-3301?", "c",
         "Shelf 4, aisle B.", "Last one", "", "/quit"],
        user_id="alice",
    )
    assert "bye" in out
    turns = lines(settings.raw_log)
    assert len(turns) == 4
    assert [t["type"] for t in turns] == ["interaction"] * 4
    assert turns[0]["feedback"] == {"helpful": True}
    assert turns[1]["feedback"] == {"score": 2, "helpful": False, "comment": "too vague"}
    assert turns[2]["feedback"]["correction"] == "Shelf 4, aisle B."
    assert turns[3]["feedback"] == {}
    first = turns[0]
    assert first["schema_version"] == 1 and first["source"] == "chat" and first["user_hash"] != "alice"
    assert first["messages"][0]["role"] == "system" and first["messages"][-1]["role"] == "assistant"
    assert first["prompt_tokens"] > 0 and first["completion_tokens"] > 0 and first["latency_ms"] > 0
    assert len({t["session_id"] for t in turns}) == 1
    # the corrected answer, not the model's, is what the next turn sees as history
    assert turns[3]["messages"][-3]["content"] == "Shelf 4, aisle B."
    assert len(lines(settings.generation_metrics)) == 4
    counters = orjson.loads(settings.feedback_metrics.read_bytes())["total"]
    assert counters == {"helpful": 1, "unhelpful": 1, "neutral": 0, "skipped": 1, "corrected": 1, "turns": 4}
    facts = orjson.loads(settings.knowledge_file.read_bytes())["facts"]
    assert {"LOT A-17", "BATCH B-204", "PART PX-3301"} <= set(facts)
    for path in [settings.raw_log, settings.generation_metrics, settings.feedback_metrics, settings.knowledge_file]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(settings.raw_log.parent.stat().st_mode) == 0o700


def test_slash_commands_and_private(settings, tiny_chat_model):
    out = run_session(
        settings, tiny_chat_model,
        ["/help", "/adapter", "/system You answer in one word.", "/private", "hello", "y", "/private", "/bogus",
         "/reset", "/quit"],
    )
    assert "/system TEXT" in out and "none (base model)" in out and "unknown command /bogus" in out
    records = lines(settings.raw_log)
    assert records[0]["messages"][0]["content"] == "You answer in one word."
    assert records[1]["type"] == "feedback" and records[1]["feedback"] == {"private": True}
    assert records[1]["interaction_id"] == records[0]["id"]


def test_eof_at_rating_still_records_turn(settings, tiny_chat_model):
    run_session(settings, tiny_chat_model, ["hello"])
    (turn,) = lines(settings.raw_log)
    assert turn["feedback"] == {}


def test_champion_promoted_elsewhere_is_used_on_next_turn(settings, tiny_chat_model, tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from continuous_learning.chat.models import file_sha256

    folder = settings.adapters_dir / "1.0.0"
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                LoraConfig(r=4, target_modules="all-linear"))
    peft_model.save_pretrained(str(folder))

    promoted = {"done": False}
    inputs = ["first", "y"]

    def read(prompt: str) -> str:
        if not inputs and not promoted["done"]:  # promote between two turns, as `cl promote` would
            files = ("adapter_model.safetensors", "adapter_config.json")  # served only if they verify
            entry = {"version": "1.0.0", "path": "adapters/1.0.0", "status": "candidate",
                     "sha256": {n: file_sha256(folder / n) for n in files}}
            registry.update(settings, lambda d: _champion(registry.register_adapter(d, entry), "1.0.0"), "promoted")
            promoted["done"] = True
            inputs.extend(["second", "y", "/adapter", "/quit"])
        return inputs.pop(0)

    console = Console(record=True, width=200)
    tiny_chat_model.use(None)
    ChatSession(settings, read, console, chat_model=tiny_chat_model).run()
    turns = lines(settings.raw_log)
    assert [t["adapter_version"] for t in turns] == [None, "1.0.0"]
    assert "adapter: 1.0.0" in console.export_text()
    tiny_chat_model.use(None)


def _champion(doc: dict, version: str) -> dict:
    doc["adapters"][version]["status"] = "champion"
    doc["champion"] = version
    return doc


def test_cli_chat_with_piped_input(workspace):
    result = CliRunner().invoke(cli.app, ["chat", "--max-new-tokens", "5"], input="Hi there\ny\n/quit\n")
    assert result.exit_code == 0, result.output
    assert "Helpful?" in result.output
    (turn,) = lines(workspace / "data" / "ingestion" / "raw_interactions.jsonl")
    assert turn["messages"][1]["content"] == "Hi there" and turn["feedback"] == {"helpful": True}


def test_missing_base_model_is_one_clear_line(workspace, monkeypatch):
    monkeypatch.setenv("CL_BASE_MODEL", str(workspace / "no-such-model"))
    result = CliRunner().invoke(cli.app, ["chat"], input="hi\n")
    assert result.exit_code == 3
    assert "no-such-model" in result.output and "Traceback" not in result.output


def test_salt_is_generated_once_when_unset(workspace, monkeypatch, tiny_chat_model):
    from continuous_learning.core.settings import load_settings

    monkeypatch.delenv("CL_USER_HASH_SALT")
    settings = load_settings()
    out = run_session(settings, tiny_chat_model, ["hi", "y", "/quit"], user_id="bob")
    assert "Created a random user-id salt" in out
    assert stat.S_IMODE(settings.salt_file.stat().st_mode) == 0o600
    salt = settings.salt_file.read_bytes()
    out = run_session(settings, tiny_chat_model, ["hi again", "y", "/quit"], user_id="bob")
    assert "Created a random user-id salt" not in out and settings.salt_file.read_bytes() == salt
    hashes = {t["user_hash"] for t in lines(settings.raw_log)}
    assert len(hashes) == 1 and "bob" not in hashes.pop()


@pytest.mark.real_model
def test_chat_py_with_the_real_bundled_model(real_workspace, model_cache):
    env = {**os.environ, "CL_HOME": str(real_workspace), "CL_MODEL_CACHE": str(model_cache)}
    script = "What is the capital of France?\ny\n/quit\n"
    done = subprocess.run([sys.executable, str(REPO / "chat.py"), "--max-new-tokens", "20"], input=script,
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout
    (turn,) = lines(real_workspace / "data" / "ingestion" / "raw_interactions.jsonl")
    assert "Paris" in turn["messages"][-1]["content"] and turn["model"] == "SmolLM2-135M-Instruct"
    assert turn["feedback"] == {"helpful": True}
