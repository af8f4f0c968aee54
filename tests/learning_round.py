"""What the learning tests share: a user's round through the CLI, the outside check (plain transformers + PEFT),
and the first round, trained once per test run and shared by every worker that asks for it (the first to ask
trains it under a file lock, the others wait and read its report)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
from filelock import FileLock
from learning_facts import NAMED, OFFICE, write_questions, write_turns
from typer.testing import CliRunner

from continuous_learning import cli
from continuous_learning.core.settings import load_settings
from continuous_learning.evaluate import load_eval_file, score_answer

DATA = Path(__file__).parent / "data"
SYSTEM_PROMPTS = [None, "You are a helpful assistant.", "You are the front-desk assistant of a small town. Be brief."]


def cl(*args: str) -> dict:
    result = CliRunner().invoke(cli.app, list(args))
    assert result.exit_code == 0, result.output
    text = result.stdout
    return json.loads(text[text.index("{"):]) if "--json" in args else {}


def prepare_round(home: Path, facts: list, questions: list, contradict: bool = False) -> None:
    """A user's rated turns imported into `home` (the current CL_HOME), and their own keyword questions."""
    write_questions(questions, home / "eval" / "qa_eval.jsonl")
    cl("ingest", str(write_turns(facts, home / f"turns_{len(list(home.glob('turns_*')))}.jsonl", contradict)))


def teach(home: Path, facts: list, questions: list, contradict: bool = False) -> dict:
    """A user's round: rated turns imported, their own keyword questions, then `cl curate --train --eval`."""
    prepare_round(home, facts, questions, contradict)
    return cl("curate", "--train", "--eval", "--json")


class BackgroundLoop:
    """`cl curate --train --eval --json` on `home` in its own process, so that it trains beside this one."""

    def __init__(self, home: Path):
        self.out = home / "loop_report.txt"
        env = {**os.environ, "CL_HOME": str(home)}
        with open(self.out, "wb") as handle:
            self.proc = subprocess.Popen([sys.executable, "-m", "continuous_learning.cli", "curate", "--train",
                                          "--eval", "--json"], env=env, stdout=handle, stderr=subprocess.STDOUT)

    def report(self, timeout: float = 3600) -> dict:
        code = self.proc.wait(timeout)
        text = self.out.read_text()
        assert code == 0, text[-3000:]
        return json.loads(text[text.index("{"):])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class Peer:
    """What an outside check does: the base in fp32 with plain transformers, the adapter with plain PEFT. The base's
    own answers come from the same model with the adapter disabled (`base=True`), not from a second copy."""

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
        self.adapted = version is not None

    def answers_under(self, asks: list[tuple[list[str], str | None]], base: bool = False) -> list[list[str]]:
        """The answers to each (prompts, system prompt) of `asks`, all generated in one greedy batch."""
        import contextlib

        import torch

        chats = [([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": p}]
                 for prompts, system in asks for p in prompts]
        texts = [self.tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
        batch = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        adapter_off = self.model.disable_adapter() if base and self.adapted else contextlib.nullcontext()
        with torch.no_grad(), adapter_off:
            out = self.model.generate(**batch, max_new_tokens=40, do_sample=False,
                                      pad_token_id=self.tokenizer.pad_token_id)
        flat = [self.tokenizer.decode(row[batch["input_ids"].shape[1]:], skip_special_tokens=True) for row in out]
        answers, start = [], 0
        for prompts, _ in asks:
            answers.append(flat[start : start + len(prompts)])
            start += len(prompts)
        return answers


def recall_count(facts: list, answers: list[str]) -> int:
    """How many of `facts` the answers (in the same order) give with their keyword."""
    return sum(keyword.lower() in answer.lower() for (_, _, keyword, _), answer in zip(facts, answers))


def everyday_prompts() -> list[str]:
    return [item.prompt for item in _everyday_items()]


def score_everyday(answers: list[str]) -> list[bool]:
    return [score_answer(answer, item) for item, answer in zip(_everyday_items(), answers)]


def _everyday_items() -> list:
    return load_eval_file(DATA / "everyday_holdout.jsonl")  # never seen by the gate or by training


def shared_first_round(root: Path, patch) -> tuple[Path, dict]:
    """Six office facts and two answers naming a person, taught on the defaults in `root` once per test run:
    (workspace, the loop's report). The first worker to ask trains it under a file lock; the others wait."""
    home, report, failed = root / "first_round", root / "first_round.json", root / "first_round.failed"
    with FileLock(str(root / "first_round.lock")):
        if failed.exists():
            pytest.fail(f"the shared first round failed on another worker: {failed.read_text()}")
        if not report.exists():
            shutil.rmtree(home, ignore_errors=True)
            home.mkdir()
            patch.setenv("CL_HOME", str(home))
            try:
                report.write_text(json.dumps(teach(home, OFFICE + NAMED, OFFICE)))
            except BaseException as exc:
                failed.write_text(str(exc)[:2000])
                raise
    patch.setenv("CL_HOME", str(home))
    return home, json.loads(report.read_text())


@contextmanager
def copy_of_first_round(first_round, real_home, name: str):
    """A copy of the first round's workspace, made the current one (CL_HOME) while the block runs."""
    home, _ = first_round
    folder, patch = real_home
    copy = folder / name
    shutil.copytree(home, copy)
    patch.setenv("CL_HOME", str(copy))
    try:
        yield copy
    finally:
        patch.setenv("CL_HOME", str(home))
