"""Repetition control in the chat and the service: the penalty (llama.cpp's repeat_penalty, OpenAI's frequency and
presence penalties), the stop on runs of blank or identical lines, and that evaluation's greedy answers ignore it."""
from __future__ import annotations

import pytest

from continuous_learning.chat.models import (
    RepetitionControl,
    line_loop,
    looping_tokens,
    penalize_repetition,
    token_pieces,
)
from continuous_learning.core.settings import load_settings

HOW_TO = [{"role": "system", "content": "You are a helpful assistant."},
          {"role": "user", "content": "How do I write a for loop in Python?"}]


# --- pure pieces ----------------------------------------------------------------------------------------------------
def test_line_loop_stops_on_blank_runs_and_repeated_lines_only():
    assert not line_loop("Step 1\n\nStep 2\n\n", 3, 2)  # paragraph breaks are fine
    assert line_loop("Step 1\n\n\n\n", 3, 2)  # three blank lines in a row
    assert line_loop("```python\n   \n\t\n \n", 3, 2)  # whitespace-only lines are blank too
    assert not line_loop("Step 1\n\n\n", 3, 2)  # only two so far
    assert line_loop("a = 1\nprint(a)\nprint(a)\nprint(a)\n", 0, 2)  # two repeats in a row
    assert not line_loop("a = 1\nprint(a)\nprint(a)\n", 0, 2)  # one repeat
    assert not line_loop("print(a)\nprint(a)\nprint(a)", 0, 2)  # the third line is not finished yet
    one, two = "First line of it", "Second line of it"
    assert line_loop(f"Intro\n{one}\n{two}\nOther line\n\n{one}\n\n{two}\n", 0, 2)  # a paragraph coming round
    assert not line_loop("```python\nx = 1\n```\nOutput:\n```\n1\n```\n", 0, 1)  # fences repeat, lines do not
    assert not line_loop("if (a) {\n  go();\n}\nif (b) {\n  go();\n}\n", 0, 1)  # short lines are structure
    assert not line_loop("    }\n  }\n}\n", 3, 2)  # closing braces at different depths are different lines
    assert not line_loop("x\n\n\n\nx\nx\nx\n", 0, 0)  # 0 = never
    long_line = "You can bake bread at home using all kinds of ingredients."
    assert line_loop(f"{long_line}\n{long_line[:45]}", 0, 1)  # a long line coming round is caught early
    assert not line_loop(f"{long_line}\n{long_line[:30]}", 0, 1)  # ... once it has copied 40 characters


def test_looping_tokens_count_blank_runs_and_lines_already_written():
    assert looping_tokens(["Hello", " world", "\n", "Bye", "\n"]) == 0
    assert looping_tokens(["A", "\n", "\n", "\n", "\n"]) == pytest.approx(2)  # the blank lines after the first
    assert looping_tokens(["Say hello", "\n", "Say hello", "\n"]) == pytest.approx(2)  # the line and its newline
    # a token across two lines counts by the share of its characters in the wasted one
    assert looping_tokens(["Say hello", "\nSay hello", "\n"]) == pytest.approx(9 / 10 + 1)
    assert looping_tokens(["}", "\n", "}", "\n"]) == 0  # short closing lines are structure
    assert looping_tokens(["```", "\n", "x", "\n", "```", "\n"]) == 0  # a closing fence is not babble


def test_penalty_follows_llama_cpp_and_openai_rules():
    import torch

    scores = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    ids = torch.tensor([[0, 1, 2, 2]])  # prompt = [0, 1], answer = [2, 2]
    out = penalize_repetition(scores, ids, prompt_length=2, control=RepetitionControl(penalty=2.0, window=64))
    assert out.tolist() == [[1.0, -4.0, 0.5, 0.5]]  # positive scores divided, negative multiplied, unseen untouched
    windowed = penalize_repetition(scores, ids, 2, RepetitionControl(penalty=2.0, window=2))
    assert windowed.tolist() == [[2.0, -2.0, 0.5, 0.5]]  # only the last 2 tokens count
    additive = penalize_repetition(scores, ids, 2, RepetitionControl(frequency=0.5, presence=0.25))
    assert additive.tolist() == [[2.0, -2.0, 1.0 - 2 * 0.5 - 0.25, 0.5]]  # over the answer only
    assert not RepetitionControl().changes_scores and not RepetitionControl().watches_lines


def test_settings_and_requests_set_the_control(workspace):
    control = RepetitionControl.from_settings(load_settings().chat)
    assert control.changes_scores and control.watches_lines  # on by default in the chat and the service
    assert control.overridden(penalty=1.0).penalty == 1.0 and control.overridden(penalty=1.0).window == control.window
    assert control.overridden(frequency=0.3, presence=None).presence == control.presence
    env = load_settings(env={"CL_CHAT_REPETITION_PENALTY": "1.3", "CL_CHAT_MAX_BLANK_LINES": "0"}).chat
    assert (env.repetition_penalty, env.max_blank_lines) == (1.3, 0)


# --- on a model -----------------------------------------------------------------------------------------------------
def test_stream_stops_a_line_loop_and_the_penalty_changes_the_answer(settings):
    from continuous_learning.chat.models import ChatModel, answer_once

    chat = ChatModel.load(settings)
    plain, plain_stats = answer_once(chat, HOW_TO, max_new_tokens=48)
    penalized, stats = answer_once(chat, HOW_TO, max_new_tokens=48, repetition=RepetitionControl(penalty=5.0))
    assert plain_stats.completion_ids != stats.completion_ids  # the tiny random model repeats itself; 5.0 forbids it
    assert len(set(stats.completion_ids)) == len(stats.completion_ids) or stats.completion_tokens < 48
    assert "".join(token_pieces(chat.tokenizer, plain_stats.completion_ids)).strip() == plain


def test_eval_greedy_answers_ignore_the_chat_control(settings, monkeypatch):
    """The eval decodes on its own, so a chat setting (here: a huge penalty) never moves the gate's answers."""
    import dataclasses

    from continuous_learning.chat.models import ChatModel
    from continuous_learning.evaluate import greedy_batch

    chat = ChatModel.load(settings)
    before = greedy_batch(chat, [HOW_TO], max_new_tokens=12)
    loud = dataclasses.replace(settings, chat=dataclasses.replace(settings.chat, repetition_penalty=9.0))
    monkeypatch.setenv("CL_CHAT_REPETITION_PENALTY", "9.0")
    assert greedy_batch(ChatModel.load(loud), [HOW_TO], max_new_tokens=12) == before


def test_service_applies_the_default_and_takes_per_request_penalties(workspace):
    """`cl serve` penalizes by default; `repetition_penalty` (extension) and OpenAI's fields change it per request."""
    import httpx
    from test_serve import running

    def ask(**fields) -> httpx.Response:
        body = {"messages": HOW_TO, "max_tokens": 24, "temperature": 0, **fields}
        return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)

    with running() as (url, _service):
        default, off = ask(), ask(repetition_penalty=1.0)
        strong, openai_style = ask(repetition_penalty=5.0), ask(repetition_penalty=1.0, frequency_penalty=2.0)
        refused = ask(frequency_penalty=3.0)
    texts = [r.json()["choices"][0]["message"]["content"] for r in (default, off, strong, openai_style)]
    assert len(set(texts)) >= 3, texts  # the tiny model babbles: each setting changes what it says
    assert refused.status_code == 422 and "frequency_penalty" in refused.text
