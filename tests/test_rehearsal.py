"""Rehearsal examples: the base model's own answers, generated once per base model and mixed into training."""
from __future__ import annotations

import pytest

from continuous_learning.chat.models import BaseModel, bundled_gguf, resolve_base
from continuous_learning.core.settings import load_settings
from continuous_learning.registry import file_sha256
from continuous_learning.train import rehearsal


def test_rehearsal_records_are_generated_once_and_cached(workspace, monkeypatch):
    monkeypatch.setenv("CL_TRAIN_REHEARSAL_EXAMPLES", "20")
    monkeypatch.setenv("CL_TRAIN_REHEARSAL_WEIGHT", "0.25")
    settings = load_settings()
    base = resolve_base(settings)
    asked = []
    real_generate = rehearsal._generate
    monkeypatch.setattr(rehearsal, "_generate",
                        lambda s, b, prompts: asked.append(prompts) or real_generate(s, b, prompts))
    records = rehearsal.rehearsal_records(settings, base)
    prompts = rehearsal.rehearsal_prompts()
    assert asked == [prompts[:20]] and len(records) <= 20  # the random tiny model may say nothing: those are dropped
    for record in records:  # no system message: the trainer renders each under several system prompts
        user, answer = record["messages"]
        assert user["content"] in prompts[:20] and answer["role"] == "assistant" and answer["content"].strip()
        assert record["weight"] == 0.25 and record["kind"] == "rehearsal"
    assert rehearsal._cache_file(settings, base, prompts[:20]).exists()

    def no_generation(*args, **kwargs):
        raise AssertionError("the cache should have answered")

    monkeypatch.setattr(rehearsal, "_generate", no_generation)
    assert rehearsal.rehearsal_records(settings, base) == records


def test_the_bundled_model_on_defaults_gets_the_shipped_answers(tmp_path, monkeypatch):
    """A fresh machine does not spend a minute and a half generating what every install of the bundled model
    would generate alike; the shipped file must match the defaults' cache key, or it is stale."""
    for name in ("CL_BASE_MODEL", "CL_TRAIN_REHEARSAL_EXAMPLES", "CL_CHAT_SYSTEM_PROMPT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CL_MODEL_CACHE", str(tmp_path / "cache"))
    settings = load_settings(home=tmp_path)
    gguf = bundled_gguf()
    base = BaseModel(name=gguf.stem, path=str(gguf), sha256=file_sha256(gguf))  # what resolve_base fingerprints
    monkeypatch.setattr(rehearsal, "_generate", lambda *args: pytest.fail("the shipped answers should be used"))
    records = rehearsal.rehearsal_records(settings, base)
    assert len(records) == settings.train.rehearsal_examples == len(rehearsal.rehearsal_prompts())
    assert [r["messages"][0]["content"] for r in records] == rehearsal.rehearsal_prompts()


def test_rehearsal_off_means_nothing_is_generated(workspace):
    settings = load_settings()
    assert settings.train.rehearsal_examples == 0
    assert rehearsal.rehearsal_records(settings, resolve_base(settings)) == []


def test_no_rehearsal_prompt_is_in_the_general_ability_anchor():
    from continuous_learning.evaluate import general_file, load_eval_file

    anchor = {item.prompt.lower() for item in load_eval_file(general_file(load_settings(home=".", env={})))}
    assert not anchor & {p.lower() for p in rehearsal.rehearsal_prompts()}
