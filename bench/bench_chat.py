"""Chat start-up with the cached default model: time until `cl chat` shows its prompt (against loading the GGUF
each time), first-token latency for a short prompt, and generation speed with an adapter against the base alone."""
from __future__ import annotations


import os
import select
import subprocess
import sys
import time

from .common import child_env, median, result, timings
from .workspaces import apply_env, temp_home, workspace_env

READY_GOAL_S = 3.0
FIRST_TOKEN_GOAL_S = 0.5
ADAPTER_SPEED_GOAL = 0.9
SHORT_PROMPT = [{"role": "user", "content": "Hi! What is 2 + 2?"}]
SPEED_PROMPTS = ["Explain how a refrigerator works.", "Write three tips for a job interview.",
                 "What is the capital of France and why is it famous?"]

GGUF_LOAD = """
import os, torch
torch.set_num_threads(int(os.environ.get("CL_MODEL_THREADS") or torch.get_num_threads()))
from transformers import AutoModelForCausalLM, AutoTokenizer
from continuous_learning.chat.models import bundled_gguf
g = bundled_gguf()
AutoTokenizer.from_pretrained(str(g.parent), gguf_file=g.name)
AutoModelForCausalLM.from_pretrained(str(g.parent), gguf_file=g.name, dtype=torch.float32)
"""


def time_to_prompt(env: dict, timeout: float = 120.0) -> float:
    """Seconds from starting `cl chat` until it prints its first `you>` prompt (then it is sent /quit)."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "continuous_learning.cli", "chat"], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    seen = b""
    try:
        while b"you>" not in seen:
            if time.perf_counter() - started > timeout or proc.poll() is not None:
                raise RuntimeError(f"cl chat showed no prompt: {seen[-500:]!r}")
            ready, _, _ = select.select([proc.stdout], [], [], 0.5)
            if ready:
                seen += os.read(proc.stdout.fileno(), 65536)
        took = time.perf_counter() - started
        proc.communicate(b"/quit\n", timeout=30)
        return took
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def gguf_load_s(env: dict) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", GGUF_LOAD], env=env, check=True, capture_output=True)
    return time.perf_counter() - started


def make_adapter(chat, folder) -> None:
    """A LoRA r16 adapter on every linear layer (as `cl train` makes), with non-zero weights, saved to `folder`."""
    import torch
    from peft import LoraConfig, get_peft_model

    from continuous_learning.chat.models import load_model

    model = get_peft_model(load_model(chat.base), LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.01)
    model.save_pretrained(str(folder))


def tokens_per_s(chat, max_new_tokens: int) -> float:
    from continuous_learning.chat.models import answer_once

    tokens = seconds = 0.0
    for prompt in SPEED_PROMPTS:
        _, stats = answer_once(chat, [{"role": "user", "content": prompt}], max_new_tokens=max_new_tokens)
        tokens += stats.completion_tokens
        seconds += stats.latency_ms / 1000
    return tokens / seconds


def run(repeats: int, quick: bool) -> dict:
    with temp_home('chat') as home:
        return _run(home, repeats, quick)


def _run(home, repeats: int, quick: bool) -> dict:
    env = workspace_env(home)
    apply_env(env)
    from continuous_learning.chat.models import ChatModel, answer_once, resolve_base
    from continuous_learning.core.settings import load_settings

    settings = load_settings()
    resolve_base(settings)  # convert the bundled GGUF once (cached between runs): the state this goal is about
    runs = max(1, min(repeats, 3 if quick else 5))
    full_env = child_env(**env)
    ready = [time_to_prompt(full_env) for _ in range(runs)]
    gguf = [gguf_load_s(full_env) for _ in range(1 if quick else min(runs, 3))]

    load_s, chat = timings(lambda: ChatModel.load(settings), 1)
    first = []
    for _ in range(runs):
        _, stats = answer_once(chat, SHORT_PROMPT, max_new_tokens=8)
        first.append(stats.first_token_ms / 1000)
    make_adapter(chat, home / "adapter")
    new_tokens = 16 if quick else 48
    speeds = {"base": [], "adapter": []}
    for _ in range(max(1, min(repeats, 3))):
        for arm in ("base", "adapter"):
            chat.use(None if arm == "base" else "9.9.9", home / "adapter")
            speeds[arm].append(tokens_per_s(chat, new_tokens))
    base_tps, adapter_tps = median(speeds["base"]), median(speeds["adapter"])
    ready_s, first_s, gguf_s = median(ready), median(first), median(gguf)
    speed_ratio = round(adapter_tps / base_tps, 3)
    raw = {
        "cl_chat_ready_s": [round(s, 2) for s in ready], "cl_chat_ready_median_s": round(ready_s, 2),
        "gguf_load_s": [round(s, 2) for s in gguf], "gguf_load_median_s": round(gguf_s, 2),
        "chatmodel_load_in_process_s": round(load_s[0], 2),
        "first_token_s": [round(s, 3) for s in first], "first_token_median_s": round(first_s, 3),
        "tokens_per_s_base": [round(s, 1) for s in speeds["base"]],
        "tokens_per_s_adapter": [round(s, 1) for s in speeds["adapter"]],
        "adapter_speed_ratio": speed_ratio, "new_tokens_per_answer": new_tokens,
        "torch_threads": env["CL_MODEL_THREADS"], "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    met = ready_s < READY_GOAL_S and first_s < FIRST_TOKEN_GOAL_S and speed_ratio >= ADAPTER_SPEED_GOAL
    return result(
        workload="chat start-up with the cached default model",
        baseline="loading the bundled GGUF (tokenizer + dequantised model) each time",
        goal="prompt shown in < 3 s; first token < 0.5 s for a short prompt; tokens/s with an adapter >= 0.9x base",
        ratio_value=round(gguf_s / ready_s, 2), goal_met=met, raw=raw,
        where_time_goes=(f"`cl chat` to its prompt {ready_s:.2f} s: Python, the CLI, settings and resolving the cached "
                         f"model folder; the model itself ({load_s[0]:.2f} s in-process, mostly importing transformers "
                         f"and torch, then the weights) loads in a background thread behind the prompt. The GGUF path "
                         f"spends {gguf_s:.1f} s reading and dequantising every start"),
        summary=(f"`cl chat` shows its prompt after {ready_s:.2f} s (GGUF each time: {gguf_s:.1f} s); first token "
                 f"{first_s * 1000:.0f} ms; {adapter_tps:.1f} tokens/s with a LoRA r16 all-linear adapter against "
                 f"{base_tps:.1f} for the base ({speed_ratio}x)."),
    )
