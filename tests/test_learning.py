"""The loop on the real bundled model, on DEFAULT settings, checked the way an outsider checks it: plain
transformers + PEFT load the promoted adapter and answer paraphrased questions under several system prompts,
and everyday questions the gate never saw must still be answered.

Round one teaches six facts (a dozen rated turns), round two six others on top; a third workspace feeds answers
that contradict round one and must be refused."""
from __future__ import annotations

import json
from contextlib import contextmanager
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from continuous_learning import cli, registry
from continuous_learning.evaluate import load_eval_file, score_answer
from continuous_learning.core.settings import load_settings
from learning_facts import GARDEN, NAMED, OFFICE, write_questions, write_turns

pytestmark = pytest.mark.real_model
DATA = Path(__file__).parent / "data"
SYSTEM_PROMPTS = [None, "You are a helpful assistant.", "You are the front-desk assistant of a small town. Be brief."]


def cl(*args: str) -> dict:
    result = CliRunner().invoke(cli.app, list(args))
    assert result.exit_code == 0, result.output
    text = result.stdout
    return json.loads(text[text.index("{"):]) if "--json" in args else {}


def teach(home: Path, facts: list, questions: list, contradict: bool = False) -> dict:
    """A user's round: rated turns imported, their own keyword questions, then `cl curate --train --eval`."""
    write_questions(questions, home / "eval" / "qa_eval.jsonl")
    cl("ingest", str(write_turns(facts, home / f"turns_{len(list(home.glob('turns_*')))}.jsonl", contradict)))
    return cl("curate", "--train", "--eval", "--json")


class Peer:
    """What an outside check does: the base in fp32 with plain transformers, the adapter with plain PEFT."""

    def __init__(self, home: Path, version: str | None):
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from continuous_learning.chat.models import resolve_base

        base = resolve_base(load_settings(home=home))
        self.tokenizer = AutoTokenizer.from_pretrained(base.path)
        self.tokenizer.padding_side = "left"
        model = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32)
        self.model = (PeftModel.from_pretrained(model, str(home / "adapters" / version)) if version else model).eval()

    def answers(self, prompts: list[str], system: str | None) -> list[str]:
        import torch

        chats = [([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": p}]
                 for p in prompts]
        texts = [self.tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
        batch = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = self.model.generate(**batch, max_new_tokens=40, do_sample=False,
                                      pad_token_id=self.tokenizer.pad_token_id)
        return [self.tokenizer.decode(row[batch["input_ids"].shape[1]:], skip_special_tokens=True) for row in out]

    def recalled(self, facts: list, system: str | None) -> int:
        answers = self.answers([question for _, question, _, _ in facts], system)
        return sum(keyword.lower() in answer.lower() for (_, _, keyword, _), answer in zip(facts, answers))

    def everyday(self, system: str | None) -> list[bool]:
        items = load_eval_file(DATA / "everyday_holdout.jsonl")  # never seen by the gate or by training
        return [score_answer(a, i) for i, a in zip(items, self.answers([i.prompt for i in items], system))]


@pytest.fixture(scope="module")
def real_home(tmp_path_factory, model_cache):
    """A fresh workspace on the bundled model with no cl.toml and no flags: the environment a new user has."""
    with pytest.MonkeyPatch.context() as patch:
        for name in ("CL_BASE_MODEL", "CL_TRAIN_REHEARSAL_EXAMPLES", "CL_CHAT_MAX_NEW_TOKENS"):
            patch.delenv(name, raising=False)
        patch.setenv("CL_MODEL_CACHE", str(model_cache))
        patch.setenv("CL_USER_HASH_SALT", "learning-tests")
        home = tmp_path_factory.mktemp("learning")
        patch.setenv("CL_HOME", str(home))
        yield home, patch


@pytest.fixture(scope="module")
def first_round(real_home):
    home, _ = real_home
    return home, teach(home, OFFICE + NAMED, OFFICE)


@pytest.fixture(scope="module")
def first_peer(first_round):
    home, report = first_round
    return Peer(home, report["train"]["version"])


def test_a_dozen_rated_turns_are_learned_and_promoted_on_defaults(first_round, first_peer):
    home, report = first_round
    assert report["eval"]["promoted"] is True, report["eval"]["decision"]["summary"]
    assert report["eval"]["subject"]["passed"] >= 5
    # The target is 5 of 6 under any prompt; runs recall 5-6 under the prompts and 4-6 under the third, which
    # training never saw (README, How the loop learns). Without training, the base recalls none.
    for system in SYSTEM_PROMPTS:
        assert first_peer.recalled(OFFICE, system) >= 4, system
    base = Peer(home, None)
    assert base.recalled(OFFICE, SYSTEM_PROMPTS[1]) < 4  # the bound above is not met without learning
    kept, before = first_peer.everyday("You are a helpful assistant."), base.everyday("You are a helpful assistant.")
    # The target is at most 1 of 20 lost; runs on the 135M model lost 0 to 3 of these 25 (README, How the loop
    # learns). Without the KL term a quarter is lost, which this bound still catches.
    assert sum(b and not k for k, b in zip(kept, before)) <= 3


@contextmanager
def copy_of_first_round(first_round, real_home, name: str):
    """A copy of the first round's workspace, made the current one (CL_HOME) while the block runs."""
    home, _ = first_round
    copy = home.parent / name
    shutil.copytree(home, copy)
    _, patch = real_home
    patch.setenv("CL_HOME", str(copy))
    try:
        yield copy
    finally:
        patch.setenv("CL_HOME", str(home))


def test_a_second_round_learns_new_facts_and_the_gate_guards_the_first(first_round, real_home):
    """The target is a promoted second round that keeps at least 4 of the first six facts. Runs so far keep 4 of
    them and learn 4 new ones, but the gate measures too few gains on 12 questions to promote (README, How the loop
    learns: a known gap). What must hold meanwhile: the round warm-starts from the champion, learns the new facts,
    and is promoted only if the first ones survive."""
    with copy_of_first_round(first_round, real_home, "second_round") as second:
        report = teach(second, GARDEN, OFFICE + GARDEN)
    assert report["train"]["parent"] == report["eval"]["against"]["version"]  # warm-started from the champion
    peer = Peer(second, report["train"]["version"])
    assert peer.recalled(GARDEN, "You are a helpful assistant.") >= 3  # the base and the champion know none
    kept = peer.recalled(OFFICE, "You are a helpful assistant.")
    assert kept >= 4 or report["eval"]["promoted"] is False, report["eval"]["decision"]["summary"]


def test_a_candidate_taught_wrong_answers_is_refused(first_round, real_home):
    """Half the champion's facts contradicted (a shorter run than all six would take; the gate sees them all)."""
    with copy_of_first_round(first_round, real_home, "wrong_answers") as wrong:
        champion = registry.load(load_settings(home=wrong))["champion"]
        report = teach(wrong, OFFICE[:3], OFFICE, contradict=True)
        assert report["eval"]["promoted"] is False
        assert report["eval"]["decision"]["promote"] is False and "not promoted" in report["eval"]["decision"]["summary"]
        assert registry.load(load_settings(home=wrong))["champion"] == champion


def test_trained_adapters_never_write_placeholders(first_round, first_peer):
    """The stored answers say "approved by <PERSON> in the finance office"; the placeholder is masked from the loss,
    so the adapter learns the rest of the answer but never learns to write `<PERSON>`."""
    home, report = first_round
    snapshot = registry.find_snapshot(registry.load(load_settings(home=home)), report["curate"]["id"])
    assert "<PERSON>" in (home / snapshot["file"]).read_text()
    prompts = [prompt for turns, *_ in NAMED for prompt, _ in turns] + [question for _, question, _, _ in NAMED]
    for system in SYSTEM_PROMPTS:
        for answer in first_peer.answers(prompts, system):
            assert "<" not in answer and "person>" not in answer.lower(), answer
