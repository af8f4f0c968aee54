"""From snapshot records to training examples: the chat template rendered, only the final assistant answer
labelled (sanitizer placeholders never), the system prompts an example is trained under, and the pair's rejected
answer encoded beside its chosen one. Evaluation encodes with the same functions, so both mask alike."""
from __future__ import annotations

import math
import re
from collections.abc import Iterable
from pathlib import Path

from ..storage.crypto import cipher_from_env, open_messages
from ..storage.store import ReadReport, iter_jsonl
from . import preference

IGNORE_INDEX = -100
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")
# System prompts an example is trained under, in turn (None: the chat template's own default), so what is
# learned does not hang on one prompt. The chat's configured prompt is added to these.
SYSTEM_PROMPT_VARIANTS = (
    None,
    "You are a helpful assistant.",
    "You are a concise assistant. Answer in one or two sentences.",
    "You are a friendly support assistant for our team.",
    "Answer the user's question accurately.",
)
PLACEHOLDER = re.compile(r"<[A-Z][A-Z0-9_]{2,}>")  # what the sanitizer writes instead of personal data: never learned


def label_count(example: dict) -> int:
    return sum(1 for t in example["labels"] if t != IGNORE_INDEX)


def end_of_turn_ids(tokenizer) -> set[int]:
    cached = getattr(tokenizer, "_cl_end_of_turn_ids", None)  # get_vocab() builds a 49k-entry dict per call
    if cached is not None:
        return cached
    ids = _end_of_turn_ids(tokenizer)
    try:
        tokenizer._cl_end_of_turn_ids = ids
    except (AttributeError, TypeError):  # pragma: no cover - a tokenizer that refuses new attributes
        pass
    return ids


def _end_of_turn_ids(tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    unk = tokenizer.unk_token_id
    for token in END_OF_TURN_TOKENS:
        if token in tokenizer.get_vocab():
            token_id = tokenizer.convert_tokens_to_ids(token)
            if token_id is not None and token_id != unk:
                ids.add(token_id)
    return ids


def _render_ids(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def placeholder_tokens(tokenizer, messages: list[dict], ids: list[int]) -> set[int]:
    """Positions of `ids` (the rendered conversation) inside a sanitizer placeholder such as `<PERSON>`."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = [m.span() for m in PLACEHOLDER.finditer(text)]
    if not spans:
        return set()
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if list(encoded["input_ids"][: len(ids)]) != list(ids[: len(encoded["input_ids"])]):
        return set()  # pragma: no cover - a tokenizer whose rendering is not stable
    return {i for i, (a, b) in enumerate(encoded["offset_mapping"])
            if any(a < end and b > begin for begin, end in spans)}


def encode_example(tokenizer, messages: list[dict], max_seq_len: int) -> tuple[list[int], list[int]] | None:
    """(input_ids, labels) for one conversation: only the FINAL assistant message (and its end-of-turn token) is
    trained on; everything else is -100, and so are the tokens of sanitizer placeholders (`<PERSON>`...), so the
    model never learns to write them. Too long: the prompt is cut from the left so the answer survives.
    Returns None for a conversation that has nothing to learn (no final assistant answer)."""
    if len(messages) < 2 or messages[-1].get("role") != "assistant" or not str(messages[-1].get("content", "")).strip():
        return None
    if not any(m.get("role") == "user" for m in messages[:-1]):
        return None
    full = _render_ids(tokenizer, messages, add_generation_prompt=False)
    prefix = _render_ids(tokenizer, messages[:-1], add_generation_prompt=True)
    start = 0
    while start < min(len(full), len(prefix)) and full[start] == prefix[start]:
        start += 1
    prompt, answer = full[:start], full[start:]
    ends = end_of_turn_ids(tokenizer)
    last_end = max((i for i, t in enumerate(answer) if t in ends), default=None)
    if last_end is not None:  # drop what the template adds after the end-of-turn token (a newline, ...)
        answer = answer[: last_end + 1]
    if not prompt or not answer:
        return None
    hidden = placeholder_tokens(tokenizer, messages, full) if PLACEHOLDER.search(messages[-1]["content"]) else set()
    labels = [IGNORE_INDEX if start + i in hidden else t for i, t in enumerate(answer)]
    if all(t == IGNORE_INDEX or t in ends for t in labels):
        return None  # nothing but placeholders: nothing to learn
    if len(prompt) + len(answer) > max_seq_len:
        keep_prompt = min(len(prompt), max(max_seq_len - len(answer), max_seq_len // 2))
        prompt = prompt[len(prompt) - keep_prompt :]
        answer, labels = answer[: max_seq_len - keep_prompt], labels[: max_seq_len - keep_prompt]
    return prompt + answer, [IGNORE_INDEX] * len(prompt) + labels


def load_examples(path: Path) -> tuple[list[dict], int]:
    """The snapshot's records and how many lines were unreadable."""
    report = ReadReport()
    cipher = cipher_from_env()
    rows = [preference.open_fields(open_messages(record, cipher), cipher) for _, record in iter_jsonl(path, report)]
    return rows, report.skipped


def pad_token_id(tokenizer) -> int:
    """What padded rows are filled with (masked out of every loss, so any id would do; 0 without a pad token)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def with_system_prompt(messages: list[dict], system_prompt: str | None) -> list[dict]:
    """`messages` under `system_prompt` (kept as they are when they bring their own, or when it is None: then
    chat templates such as SmolLM2's insert their own default)."""
    if not system_prompt or (messages and isinstance(messages[0], dict) and messages[0].get("role") == "system"):
        return messages
    return [{"role": "system", "content": system_prompt}, *messages]


def system_prompts(chat_prompt: str | None, vary: bool) -> list[str | None]:
    """The system prompts each example is trained under: the chat's alone, or it and the varied ones."""
    if not vary:
        return [chat_prompt or None]
    variants = list(SYSTEM_PROMPT_VARIANTS)
    if chat_prompt and chat_prompt not in variants:
        variants.insert(1, chat_prompt)
    return variants


def tokenize_examples(tokenizer, records: Iterable[dict], max_seq_len: int,
                      system_prompt: str | None | list[str | None] = None) -> tuple[list[dict], int]:
    """Encoded examples {input_ids, labels, weight, id, record} and the count of records skipped as unusable.

    With a list of system prompts, each record gives one example per prompt (all with the same `record` index):
    the step plan walks through them so that successive passes over a record see different prompts."""
    prompts = system_prompt if isinstance(system_prompt, list) else [system_prompt]
    out, skipped, kept = [], 0, 0
    for record in records:
        messages = record.get("messages") if isinstance(record, dict) else None
        try:
            weight = float(record.get("weight", 1.0)) if isinstance(record, dict) else 1.0
        except (TypeError, ValueError):
            weight = float("nan")
        variants = []
        role = preference.role_of(record) if isinstance(record, dict) else preference.DESIRABLE
        if isinstance(messages, list) and math.isfinite(weight) and weight >= 0:
            own = bool(messages) and isinstance(messages[0], dict) and messages[0].get("role") == "system"
            for prompt in prompts[:1] if own else prompts:
                variant = _encode_variant(tokenizer, with_system_prompt(messages, prompt), max_seq_len, record, role)
                if variant is not None:
                    variants.append(variant)
        if not variants:
            skipped += 1
            continue
        for variant in variants:
            out.append({"id": record.get("id"), "weight": weight, "record": kept, "kind": record.get("kind"),
                        "role": role, **variant})
        kept += 1
    return out, skipped


def _encode_variant(tokenizer, messages: list[dict], max_seq_len: int, record: dict, role: str) -> dict | None:
    """input_ids/labels of one prompt variant; a pair also gets its rejected answer under the same prompt."""
    encoded = encode_example(tokenizer, messages, max_seq_len)
    if encoded is None:
        return None
    variant = {"input_ids": encoded[0], "labels": encoded[1]}
    if role == preference.PAIR:
        rejected = [*messages[:-1], {"role": "assistant", "content": preference.rejected_text(record)}]
        other = encode_example(tokenizer, rejected, max_seq_len)
        if other is not None:
            variant["rejected"] = {"input_ids": other[0], "labels": other[1]}
    return variant

