"""Where to chat with an exported model: llama.cpp's tokens/s on the exported merged GGUF next to `cl chat`'s own
(PyTorch ChatModel) on the same prompts, and how the chat's repetition control keeps how-to answers from babbling.

Run alone: `python -m bench.bench_export [--quick]` (prints JSON). `run()` has the shape of the other benchmarks'
results so `make bench` can add it later.
"""
from __future__ import annotations

import os
import sys
import time

from .common import median, result
from .workspaces import apply_env, temp_home, workspace_env

SPEED_PROMPTS = ["Explain how a refrigerator works.", "Write three tips for a job interview.",
                 "What is the capital of France and why is it famous?"]
HOW_TO_QUESTIONS = [
    "How do I write a for loop in Python?", "How do I reverse a string in JavaScript?",
    "How do I center a div in CSS?", "How do I read a file line by line in Python?",
    "How do I create a virtual environment in Python?", "How do I set up a new git repository?",
    "How do I make a cup of tea?", "How do I change a flat tire?", "How do I bake bread at home?",
    "How do I sort a list of dictionaries by a key in Python?",
]
SYSTEM = "You are a helpful assistant."


def _chat(prompt: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]


def torch_tokens_per_s(chat, prompts: list[str], max_new_tokens: int, repetition=None) -> float:
    from continuous_learning.chat.models import answer_once

    tokens = seconds = 0.0
    for prompt in prompts:
        _, stats = answer_once(chat, _chat(prompt), max_new_tokens=max_new_tokens, repetition=repetition)
        tokens += stats.completion_tokens
        seconds += stats.latency_ms / 1000
    return tokens / seconds


def llama_cpp_tokens_per_s(gguf_path, prompts: list[str], max_new_tokens: int, threads: int,
                           repeat_penalty: float = 1.0) -> float:
    """Greedy chat completions through llama-cpp-python on `gguf_path` (its own chat template), tokens/s."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf_path), n_ctx=1024, n_threads=threads, n_threads_batch=threads, verbose=False,
                seed=0)  # n_threads_batch too: its default (every core) spins and crawls on busy cores (4-8x here)
    llm.create_chat_completion(_chat("Hi"), max_tokens=4, temperature=0.0)  # warm-up
    tokens = seconds = 0.0
    for prompt in prompts:
        started = time.perf_counter()
        out = llm.create_chat_completion(_chat(prompt), max_tokens=max_new_tokens, temperature=0.0,
                                         repeat_penalty=repeat_penalty)
        seconds += time.perf_counter() - started
        tokens += out["usage"]["completion_tokens"]
    return tokens / seconds


def chat_repetition(chat, control, questions: list[str] = HOW_TO_QUESTIONS, max_new_tokens: int = 256) -> list[dict]:
    """For each how-to question: tokens spent on blank or repeated lines, answer length, whether the line check
    stopped it, with `control` (a RepetitionControl) as the chat applies it."""
    from continuous_learning.chat.models import answer_once, looping_tokens, token_pieces

    rows = []
    for question in questions:
        answer, stats = answer_once(chat, _chat(question), max_new_tokens=max_new_tokens, repetition=control)
        pieces = token_pieces(chat.tokenizer, stats.completion_ids)
        rows.append({"question": question, "tokens": stats.completion_tokens,
                     "looping_tokens": round(looping_tokens(pieces), 1), "stopped_looping": stats.stopped_looping,
                     "answer": answer})
    return rows


def export_merged(settings, home) -> "object":
    """Export the base model (no adapter: the figures are about the runtime) as merged F16 GGUF."""
    from continuous_learning.export import export_model

    return export_model(settings, "base", formats=("gguf-merged",), quants=("f16",), out=home / "export")


def run(repeats: int = 1, quick: bool = False) -> dict:
    with temp_home("export") as home:
        return _run(home, repeats, quick)


def _run(home, repeats: int, quick: bool) -> dict:
    env = workspace_env(home)
    apply_env(env)
    from continuous_learning.chat.models import ChatModel, RepetitionControl
    from continuous_learning.core.settings import load_settings

    settings = load_settings()
    threads = int(env["CL_MODEL_THREADS"])
    exported = export_merged(settings, home)
    gguf = exported.file("merged-gguf", "f16")
    chat = ChatModel.load(settings)
    new_tokens = 32 if quick else 96
    prompts = SPEED_PROMPTS[:1] if quick else SPEED_PROMPTS
    runs = max(1, min(repeats, 3))
    torch_tps = [torch_tokens_per_s(chat, prompts, new_tokens) for _ in range(runs)]
    llama_tps = [llama_cpp_tokens_per_s(gguf, prompts, new_tokens, threads) for _ in range(runs)]
    control = RepetitionControl.from_settings(settings.chat)
    looping = [] if quick else chat_repetition(chat, control)
    ours, theirs = median(torch_tps), median(llama_tps)
    raw = {"torch_tokens_per_s": [round(x, 1) for x in torch_tps],
           "llama_cpp_tokens_per_s": [round(x, 1) for x in llama_tps], "new_tokens_per_answer": new_tokens,
           "threads": threads, "gguf_bytes": os.path.getsize(gguf), "load_avg_1m": round(os.getloadavg()[0], 2),
           "how_to_looping_tokens": [row["looping_tokens"] for row in looping]}
    return result(
        workload="greedy chat answers on the bundled model: exported merged F16 GGUF in llama.cpp vs cl chat",
        baseline="cl chat's PyTorch ChatModel on the same prompts and thread count",
        goal="context for users choosing where to chat (no pass/fail)",
        ratio_value=round(theirs / ours, 2) if ours else None, goal_met=True, raw=raw,
        where_time_goes="llama.cpp runs the F16 graph in C with its own threads; PyTorch pays Python per token",
        summary=f"llama.cpp {theirs:.1f} tokens/s on the merged F16 GGUF vs cl chat {ours:.1f} ({threads} thread(s))",
    )


if __name__ == "__main__":
    import orjson

    sys.stdout.write(orjson.dumps(run(quick="--quick" in sys.argv), option=orjson.OPT_INDENT_2).decode() + "\n")
