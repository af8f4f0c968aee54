"""Batched greedy generation for evaluation: prompts grouped by length, the shared prompt prefix run once, ended
rows dropped from the batch; and the timing figures a result reports. torch is imported only inside functions."""
from __future__ import annotations

import time

from ..core.settings import Settings
from .scoring import EvalItem


def by_length(conversations: list[list[dict]]) -> list[int]:
    """Indexes ordered by prompt length, so each batch holds prompts of similar length (little left padding)."""
    return sorted(range(len(conversations)), key=lambda i: (sum(len(m["content"]) for m in conversations[i]), i))


def common_prefix(rows: list[list[int]]) -> int:
    """Length of the token prefix every row shares, leaving each row at least one token of its own."""
    shortest = min(len(r) for r in rows) - 1
    length = 0
    while length < shortest and all(r[length] == rows[0][length] for r in rows):
        length += 1
    return length


def greedy_batch(chat, conversations: list[list[dict]], max_new_tokens: int) -> list[str]:
    """Greedy answers for one batch, as `generate` gives them, but cheaper on a CPU:
    - the prompt prefix all rows share (chat template and system prompt) is run once and its key/value cache
      copied to every row; each row's own tokens follow, padding between the two masked out and positions
      counted as if there were none;
    - only the last position's logits are computed;
    - rows that have ended (end-of-turn token) leave the batch and the cache, so a batch costs what its live rows
      need, not max_new_tokens steps of every row while the longest answer finishes. They leave in groups (once an
      eighth of the batch has ended): each removal copies the whole cache, and one copy per ended row cost more
      than carrying a few ended rows a few steps (measured on 32 prompts: 5.5 s against 6.0 s)."""
    import torch

    tokenizer, model = chat.tokenizer, chat.model
    texts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
    rows_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    shared = common_prefix(rows_ids)
    own = [r[shared:] for r in rows_ids]
    width = max(len(r) for r in own)
    pad = tokenizer.pad_token_id
    step_ids = torch.tensor([[pad] * (width - len(r)) + r for r in own], device=model.device)
    own_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in own], device=model.device)
    positions = (shared + own_mask.cumsum(-1) - 1).masked_fill(own_mask == 0, 1)
    past = None
    with torch.inference_mode():
        if shared:
            prefix = torch.tensor([rows_ids[0][:shared]], device=model.device)
            past = model(input_ids=prefix, use_cache=True, logits_to_keep=1).cache
            past.batch_repeat_interleave(len(rows_ids))
    mask = torch.cat([own_mask.new_ones(len(rows_ids), shared), own_mask], dim=-1)
    eos = torch.tensor(sorted(chat.eos_ids), device=model.device)
    rows = list(range(len(texts)))
    alive = torch.ones(len(rows), dtype=torch.bool, device=model.device)
    produced: list[list[int]] = [[] for _ in texts]
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            out = model(input_ids=step_ids, attention_mask=mask, position_ids=positions, cache=past,
                        use_cache=True, logits_to_keep=1)
            past, next_ids = out.cache, out.logits[:, -1].argmax(-1)
            alive = alive & ~torch.isin(next_ids, eos)
            for row, token, going in zip(rows, next_ids.tolist(), alive.tolist()):
                if going:
                    produced[row].append(token)
            still = int(alive.sum())
            if still == 0:
                break
            if len(rows) - still >= max(1, len(rows) // 8):
                live = alive.nonzero().squeeze(-1)
                past.batch_select_indices(live)
                rows = [rows[i] for i in live.tolist()]
                next_ids, mask, positions, alive = next_ids[live], mask[live], positions[live], alive[live]
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=-1)
            positions = positions[:, -1:] + 1
            step_ids = next_ids[:, None]
    return [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in produced]


KV_CACHE_BUDGET = 2 << 30  # bytes of key/value cache one eval batch may hold at its longest


def rows_per_batch(model, prompt_tokens: int, settings: Settings) -> int:
    """`eval.batch_size`, lowered so that the batch's key/value cache stays within KV_CACHE_BUDGET: 128 rows of the
    bundled 135M model hold about 1 GB, but a 7B model's would hold over 10 GB."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    element = next(model.parameters()).element_size()
    per_row = 2 * config.num_hidden_layers * heads * head_dim * element * (prompt_tokens + settings.eval.max_new_tokens)
    return max(1, min(settings.eval.batch_size, KV_CACHE_BUDGET // max(1, per_row)))


def batch_rows(chat, conversations: list[list[dict]], settings: Settings) -> int:
    """How many of `conversations` one eval batch holds (`rows_per_batch` for the longest of them)."""
    longest = max((sum(len(m["content"]) for m in c) for c in conversations), default=0)
    return rows_per_batch(chat.model, 64 + longest // 2, settings)  # template + a token per 2 chars at most


def answer_in_batches(chat, conversations: list[list[dict]], settings: Settings) -> tuple[list[str], dict]:
    size = batch_rows(chat, conversations, settings)
    order = by_length(conversations)
    answers: list[str] = [""] * len(conversations)
    started = time.perf_counter()
    for start in range(0, len(order), size):
        chunk = order[start : start + size]
        batch = greedy_batch(chat, [conversations[i] for i in chunk], settings.eval.max_new_tokens)
        for i, answer in zip(chunk, batch):
            answers[i] = answer
    seconds = time.perf_counter() - started
    tokens = sum(len(chat.tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)
    return answers, {"seconds": seconds, "tokens": tokens, "prompts": len(conversations)}


# The target questions are asked under each of these besides the chat's own prompt: none (the chat template's
# default) and one that training never uses, so a fact counts as learned when it is recalled whatever the prompt.
OTHER_SYSTEM_PROMPTS = (None, "You are a knowledgeable assistant. Answer briefly.")


def target_system_prompts(settings: Settings) -> list[str | None]:
    """The system prompts the target questions are asked under: the chat's first (its answers are the ones shown)."""
    prompts = [settings.chat.system_prompt or None]
    return prompts + [p for p in OTHER_SYSTEM_PROMPTS if p not in prompts]


def question_conversations(settings: Settings, items: list[EvalItem], system_prompt: str | None | bool = True
                           ) -> list[list[dict]]:
    """Each item's question as a conversation under `system_prompt` (True: the chat's; None: no system message)."""
    prompt = settings.chat.system_prompt if system_prompt is True else system_prompt
    system = [{"role": "system", "content": prompt}] if prompt else []
    return [system + [{"role": "user", "content": item.prompt}] for item in items]


def timing_summary(parts: list[dict]) -> dict:
    seconds = sum(p["seconds"] for p in parts)
    tokens = sum(p["tokens"] for p in parts)
    prompts = sum(p["prompts"] for p in parts)
    return {
        "generation_s": round(seconds, 3),
        "latency_ms_per_prompt": round(1000 * seconds / prompts, 1) if prompts else None,
        "completion_tokens": tokens,
        "tokens_per_s": round(tokens / seconds, 2) if seconds > 0 else None,
    }
