"""Chat with the cached default model, each figure against its like-for-like baseline:

- model load: a fresh process that loads the project's ChatModel and answers one token, against a fresh process
  that loads the same converted folder with plain transformers and answers one token (and, for context, one that
  reads the GGUF each time). How soon `cl chat` shows its prompt is reported on its own: the model then loads behind
  the prompt, so it is not a load time;
- time to first token: the chat's streaming path against a plain `generate` of one token on the same prompt;
- generation tokens/s of the chat (base, and with a merged adapter), plain `generate` and llama.cpp on the exported
  merged F16 GGUF (bench_export), each as a fraction of the memory-bandwidth bound: measured copy bandwidth (bytes
  read + written per second, one thread like the model) / bytes of weights read per token."""
from __future__ import annotations


import os
import select
import subprocess
import sys
import time

from .common import child_env, median, paired_ratios, result, spread
from .workspaces import apply_env, temp_home, workspace_env

READY_GOAL_S = 3.0
FIRST_TOKEN_GOAL_S = 0.5
ADAPTER_SPEED_GOAL = 0.9
SHORT_PROMPT = [{"role": "user", "content": "Hi! What is 2 + 2?"}]
SPEED_PROMPTS = ["Explain how a refrigerator works.", "Write three tips for a job interview.",
                 "What is the capital of France and why is it famous?"]

# Each program loads a model in a fresh process and answers one greedy token: "ready to answer".
ONE_TOKEN = """
ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, return_tensors="pt",
                              return_dict=True)["input_ids"]
model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False)
"""
THREADS = """
import os, torch
torch.set_num_threads(int(os.environ.get("CL_MODEL_THREADS") or torch.get_num_threads()))
"""
LOAD_PROGRAMS = {
    "cl_chatmodel": THREADS + """
from continuous_learning.chat.models import ChatModel
from continuous_learning.core.settings import load_settings
chat = ChatModel.load(load_settings())
model, tok = chat.model, chat.tokenizer
""" + ONE_TOKEN,
    "transformers_same_folder": THREADS + """
import sys
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
""" + ONE_TOKEN,
    "transformers_gguf_each_time": THREADS + """
from transformers import AutoModelForCausalLM, AutoTokenizer
from continuous_learning.chat.models import bundled_gguf
g = bundled_gguf()
tok = AutoTokenizer.from_pretrained(str(g.parent), gguf_file=g.name)
model = AutoModelForCausalLM.from_pretrained(str(g.parent), gguf_file=g.name, dtype=torch.float32).eval()
""" + ONE_TOKEN,
}


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


def load_s(program: str, env: dict, folder) -> float:
    """Seconds for a fresh process to load a model and answer one token."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", LOAD_PROGRAMS[program], str(folder)], env=env, check=True,
                   capture_output=True)
    return time.perf_counter() - started


def copy_bandwidth(threads: int, megabytes: int = 512) -> float:
    """Bytes per second a tensor copy moves (read + written, as STREAM counts it), best of 5, `threads` threads."""
    import torch

    torch.set_num_threads(threads)
    source = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32)
    target = torch.empty_like(source)
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        target.copy_(source)
        best = min(best, time.perf_counter() - started)
    return 2 * source.numel() * 4 / best


def weight_bytes(model) -> int:
    """Bytes of weights one decoding step reads: every parameter once (tied embeddings are one tensor; the
    embedding table is read whole as the output layer)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def first_token_plain_s(chat, messages: list[dict]) -> float:
    """A plain greedy `generate` of one token on the chat's own encoding of `messages`."""
    import torch

    ids = chat.encode_chat(messages)
    started = time.perf_counter()
    with torch.inference_mode():
        chat.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False,
                            pad_token_id=chat.tokenizer.pad_token_id)
    return time.perf_counter() - started


def plain_tokens_per_s(chat, max_new_tokens: int) -> float:
    """Plain greedy `generate` (no streamer, no stopping checks) on the speed prompts."""
    import torch

    tokens = seconds = 0.0
    for prompt in SPEED_PROMPTS:
        ids = chat.encode_chat([{"role": "user", "content": prompt}])
        started = time.perf_counter()
        with torch.inference_mode():
            out = chat.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                      max_new_tokens=max_new_tokens, pad_token_id=chat.tokenizer.pad_token_id)
        seconds += time.perf_counter() - started
        tokens += out.shape[-1] - ids.shape[-1]
    return tokens / seconds


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
    base = resolve_base(settings)  # convert the bundled GGUF once (cached between runs): the state this is about
    runs = max(1, repeats)
    full_env = child_env(**env)
    ready = [time_to_prompt(full_env) for _ in range(runs)]
    loads: dict[str, list[float]] = {name: [] for name in LOAD_PROGRAMS}
    for repeat in range(runs):  # interleaved; the GGUF path is context, not a baseline: once
        for name in LOAD_PROGRAMS:
            if repeat == 0 or name != "transformers_gguf_each_time":
                loads[name].append(load_s(name, full_env, base.path))
    load_ratio = paired_ratios(loads["transformers_same_folder"], loads["cl_chatmodel"])

    chat = ChatModel.load(settings)
    answer_once(chat, SHORT_PROMPT, max_new_tokens=2)  # warm-up
    first, first_plain = [], []
    for _ in range(runs):
        _, stats = answer_once(chat, SHORT_PROMPT, max_new_tokens=8)
        first.append(stats.first_token_ms / 1000)
        first_plain.append(first_token_plain_s(chat, SHORT_PROMPT))
    first_ratio = paired_ratios(first_plain, first)

    threads = int(env["CL_MODEL_THREADS"])
    bandwidth = copy_bandwidth(threads)
    per_token_bytes = weight_bytes(chat.model)
    bound = bandwidth / per_token_bytes
    make_adapter(chat, home / "adapter")
    new_tokens = 16 if quick else 32
    speeds: dict[str, list[float]] = {"base": [], "adapter": [], "plain_generate": []}
    for _ in range(runs):
        for arm in ("base", "adapter"):
            chat.use(None if arm == "base" else "9.9.9", home / "adapter")
            speeds[arm].append(tokens_per_s(chat, new_tokens))
        chat.use(None, home / "adapter")
        speeds["plain_generate"].append(plain_tokens_per_s(chat, new_tokens))
    llama = llama_cpp_figures(settings, home, new_tokens, threads, runs, bandwidth)
    return _report(ready, loads, load_ratio, first, first_plain, first_ratio, speeds, bound, bandwidth,
                   per_token_bytes, llama, env, new_tokens)


def llama_cpp_figures(settings, home, new_tokens: int, threads: int, runs: int, bandwidth: float) -> dict:
    """llama.cpp's tokens/s on the exported merged F16 GGUF (bench_export), or why there is none."""
    from .bench_export import SPEED_PROMPTS as EXPORT_PROMPTS, export_merged, llama_cpp_tokens_per_s

    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return {"error": "llama-cpp-python is not installed (make setup builds it)"}
    gguf = export_merged(settings, home).file("merged-gguf", "f16")
    tps = [llama_cpp_tokens_per_s(gguf, EXPORT_PROMPTS, new_tokens, threads) for _ in range(runs)]
    size = os.path.getsize(gguf)
    return {"tokens_per_s": [round(x, 1) for x in tps], "gguf_bytes": size,
            "bound_tokens_per_s": round(bandwidth / size, 1),
            "fraction_of_bound": round(median(tps) * size / bandwidth, 3)}


def _report(ready, loads, load_ratio, first, first_plain, first_ratio, speeds, bound, bandwidth, per_token_bytes,
            llama, env, new_tokens) -> dict:
    ready_s, first_s = median(ready), median(first)
    base_tps, adapter_tps, plain_tps = (median(speeds[k]) for k in ("base", "adapter", "plain_generate"))
    speed_ratio = round(adapter_tps / base_tps, 3)
    raw = {
        "cl_chat_prompt_shown_s": [round(s, 2) for s in ready],
        "load_and_first_token_s": {k: [round(s, 2) for s in v] for k, v in loads.items()},
        "load_ratio_vs_transformers_same_folder": load_ratio,
        "first_token_s": [round(s, 3) for s in first],
        "first_token_plain_generate_s": [round(s, 3) for s in first_plain],
        "first_token_ratio_vs_plain_generate": first_ratio,
        "tokens_per_s": {k: [round(s, 1) for s in v] for k, v in speeds.items()},
        "adapter_speed_ratio": speed_ratio, "new_tokens_per_answer": new_tokens,
        "copy_bandwidth_gb_s": round(bandwidth / 1e9, 2), "weight_bytes_per_token": per_token_bytes,
        "bandwidth_bound_tokens_per_s": round(bound, 1),
        "fraction_of_bound": {k: round(median(v) / bound, 3) for k, v in speeds.items()},
        "llama_cpp_merged_f16": llama,
        "torch_threads": env["CL_MODEL_THREADS"], "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    met = ready_s < READY_GOAL_S and first_s < FIRST_TOKEN_GOAL_S and speed_ratio >= ADAPTER_SPEED_GOAL
    llama_text = (f"llama.cpp on the merged F16 GGUF {median(llama['tokens_per_s']):.1f} tokens/s "
                  f"({llama['fraction_of_bound']:.0%} of its bound of {llama['bound_tokens_per_s']})"
                  if "tokens_per_s" in llama else f"llama.cpp: {llama.get('error')}")
    return result(
        workload="chat with the cached default model (bundled SmolLM2-135M, fp32 on the CPU)",
        baseline="load: plain transformers on the same converted folder, fresh process, until one token is answered; "
                 "first token: plain generate of one token; tokens/s: the memory-bandwidth bound",
        goal="prompt shown in < 3 s; first token < 0.5 s for a short prompt; tokens/s with an adapter >= 0.9x base",
        ratio_value=load_ratio["median"], goal_met=met, raw=raw,
        ratio_spread=[load_ratio["min"], load_ratio["max"]],
        why_missed=None if met else (f"prompt {ready_s:.2f} s, first token {first_s:.3f} s, adapter "
                                     f"{speed_ratio}x the base"),
        where_time_goes=(f"load: ChatModel {median(loads['cl_chatmodel']):.2f} s against plain transformers "
                         f"{median(loads['transformers_same_folder']):.2f} s on the same folder (both mostly importing "
                         f"torch and transformers, then reading {per_token_bytes / 2**20:.0f} MB of fp32 weights); "
                         f"the GGUF each time {median(loads['transformers_gguf_each_time']):.2f} s (dequantising). "
                         f"Decoding reads every weight once per token: {per_token_bytes / 2**20:.0f} MB at "
                         f"{bandwidth / 1e9:.1f} GB/s copy bandwidth bounds it at {bound:.1f} tokens/s; what is left "
                         "is Python and PyTorch per-token overhead and the 49k-word output layer's compute"),
        summary=(f"Load until one token is answered: {median(loads['cl_chatmodel']):.2f} s against "
                 f"{median(loads['transformers_same_folder']):.2f} s for plain transformers on the same folder "
                 f"({load_ratio['median']}x, {spread(load_ratio)}; the GGUF each time: "
                 f"{median(loads['transformers_gguf_each_time']):.2f} s). `cl chat` shows its prompt after "
                 f"{ready_s:.2f} s and loads the model behind it. First token {first_s * 1000:.0f} ms against "
                 f"{median(first_plain) * 1000:.0f} ms for a plain one-token generate ({first_ratio['median']}x). "
                 f"Tokens/s: chat {base_tps:.1f} (adapter merged: {adapter_tps:.1f}, {speed_ratio}x), plain generate "
                 f"{plain_tps:.1f}; the bandwidth bound is {bound:.1f}, so the chat runs at {base_tps / bound:.0%} of "
                 f"it; {llama_text}."),
    )
