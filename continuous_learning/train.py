"""The QLoRA recipe: fine-tune a PEFT LoRA adapter on a curated snapshot and register it as a candidate.

Shaped like a torchtune recipe: `Trainer(settings, ...)` with `setup()` (config validated before any heavy work),
`train()`, `save()`, `register()` and `cleanup()`; `run_training()` runs them under the workspace 'train' lock.

A run trains inside `adapters/.<version>.partial/` (metrics per step, a resumable checkpoint every
`checkpoint_every` steps) and is renamed to `adapters/<version>/` and registered only when it succeeded. A NaN loss,
an exception or Ctrl-C leaves the registry untouched and the partial folder marked with a FAILED file;
`resume=True` continues the newest partial run from its last checkpoint.

The loss is SFT on the final assistant answers, the KL rehearsal term toward the frozen base on everyday prompts,
and, when the snapshot has answers rated unhelpful or corrections, the preference terms of `preference.py` (KTO
for unpaired answers, DPO for pairs; `train.objective`), against the base measured once with the adapter disabled.

Pure pieces (config validation, step counts, the learning-rate schedule, the data order, label masking) are plain
functions so tests check them without a model. torch, transformers and peft are imported inside functions.
"""
from __future__ import annotations

import dataclasses
import math
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import orjson

from . import preference, registry
from .storage.crypto import cipher_from_env, open_messages
from .core.errors import CLError, ConfigError, InputError, NothingToDo, TrainingFailed
from .chat.models import (BaseModel, file_sha256, load_model, load_tokenizer, quiet_known_warnings, resolve_base,
    set_threads)
from .core.records import utc_now
from .core.settings import Settings, TrainConfig
from .storage.store import (ReadReport, append_jsonl, atomic_write_bytes, atomic_write_json, atomic_write_jsonl,
    ensure_dir, iter_jsonl, read_json, workspace_lock)

Progress = Callable[[dict], None]

IGNORE_INDEX = -100
MAX_GRAD_NORM = 1.0  # gradient clipping (the usual HF default); recorded in the lineage
PARTIAL_SUFFIX = ".partial"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")  # the files whose sha256 the registry keeps
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")
RUN_FILE = "run.json"
FAILED_FILE = "FAILED"
CHECKPOINT_DIR = "checkpoint"
TRAINER_STATE = "trainer_state.pt"
RESUME_HINT = "'cl train --resume' continues it from its last checkpoint; 'cl train' starts over"
LOCK_HELD_ENV = "CL_TRAIN_LOCK_HELD"  # set for launched processes: the launching process holds the workspace lock
RESULT_ENV = "CL_TRAIN_RESULT_FILE"  # where rank 0 writes the registry entry (or the error) for the launcher
PROGRESS_ENV = "CL_TRAIN_PROGRESS_JSON"  # rank 0 prints progress events as PROGRESS_PREFIX + JSON lines
PROGRESS_PREFIX = "@cl-progress "
SETTINGS_ENV = "CL_TRAIN_SETTINGS_JSON"  # the launcher's resolved settings, for launched processes
REHEARSAL_MODES = ("kl", "sft", "off")
EPOCHS_FLAG_CEILING = 1_000_000  # `--epochs N` means N passes, however many steps that takes
# System prompts an example is trained under, in turn (None: the chat template's own default), so what is
# learned does not hang on one prompt. The chat's configured prompt is added to these.
SYSTEM_PROMPT_VARIANTS = (
    None,
    "You are a helpful assistant.",
    "You are a concise assistant. Answer in one or two sentences.",
    "You are a friendly support assistant for our team.",
    "Answer the user's question accurately.",
)
REFERENCE_TOP_K = 64  # the base's next-token distribution kept per rehearsal position (the rest is one bucket)
PLACEHOLDER = re.compile(r"<[A-Z][A-Z0-9_]{2,}>")  # what the sanitizer writes instead of personal data: never learned


# --- pure pieces ------------------------------------------------------------------------------------------------
def validate_train_config(cfg: TrainConfig) -> None:
    """Reject impossible hyperparameters before anything heavy is loaded; names every bad field."""
    problems: list[str] = []

    def need(ok: bool, text: str) -> None:
        if not ok:
            problems.append(text)

    need(cfg.lora_r >= 1, f"train.lora_r must be >= 1 (got {cfg.lora_r})")
    need(math.isfinite(cfg.lora_alpha) and cfg.lora_alpha > 0, f"train.lora_alpha must be > 0 (got {cfg.lora_alpha})")
    need(0.0 <= cfg.lora_dropout < 1.0, f"train.lora_dropout must be in [0, 1) (got {cfg.lora_dropout})")
    need(bool(target_modules(cfg)), "train.target_modules is empty (use 'all-linear' or names like 'q_proj,v_proj')")
    need(math.isfinite(cfg.learning_rate) and cfg.learning_rate > 0, f"train.learning_rate must be a positive number (got {cfg.learning_rate})")
    need(cfg.epochs >= 0, f"train.epochs must be >= 0 (got {cfg.epochs})")
    need(cfg.max_steps >= 1, f"train.max_steps must be >= 1 (got {cfg.max_steps})")
    need(cfg.min_steps >= 0, f"train.min_steps must be >= 0 (got {cfg.min_steps}; max_steps wins when it is lower)")
    need(cfg.batch_size >= 1, f"train.batch_size must be >= 1 (got {cfg.batch_size})")
    need(cfg.grad_accum >= 1, f"train.grad_accum must be >= 1 (got {cfg.grad_accum})")
    need(cfg.max_seq_len >= 8, f"train.max_seq_len must be >= 8 (got {cfg.max_seq_len})")
    need(0.0 <= cfg.warmup_ratio < 1.0, f"train.warmup_ratio must be in [0, 1) (got {cfg.warmup_ratio})")
    need(math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0, f"train.weight_decay must be >= 0 (got {cfg.weight_decay})")
    need(cfg.checkpoint_every >= 0, f"train.checkpoint_every must be >= 0 (got {cfg.checkpoint_every}; 0 = never)")
    need(cfg.seed >= 0, f"train.seed must be >= 0 (got {cfg.seed})")
    need(cfg.num_processes >= 1, f"train.num_processes must be >= 1 (got {cfg.num_processes})")
    need(cfg.rehearsal in REHEARSAL_MODES, f"train.rehearsal must be one of {', '.join(REHEARSAL_MODES)} (got {cfg.rehearsal!r})")
    need(cfg.rehearsal_examples >= 0, f"train.rehearsal_examples must be >= 0 (got {cfg.rehearsal_examples})")
    need(cfg.rehearsal_per_step >= 1, f"train.rehearsal_per_step must be >= 1 (got {cfg.rehearsal_per_step})")
    need(math.isfinite(cfg.rehearsal_weight) and cfg.rehearsal_weight >= 0,
         f"train.rehearsal_weight must be >= 0 (got {cfg.rehearsal_weight})")
    need(cfg.objective in preference.OBJECTIVES,
         f"train.objective must be one of {', '.join(preference.OBJECTIVES)} (got {cfg.objective!r})")
    if problems:
        raise ConfigError("; ".join(problems), "change the flag, the [train] section of cl.toml or the CL_TRAIN_* variable")


def target_modules(cfg: TrainConfig) -> str | list[str]:
    text = cfg.target_modules.strip()
    if text == "all-linear":
        return text
    return [name.strip() for name in text.split(",") if name.strip()]


def total_steps(cfg: TrainConfig, n_examples: int, world: int = 1) -> int:
    """Optimizer steps: `epochs` passes over the examples (epochs x examples / global batch), kept between
    `min_steps` and `max_steps`; `max_steps` itself when epochs is 0."""
    if cfg.epochs <= 0:
        return cfg.max_steps
    passes = math.ceil(cfg.epochs * n_examples / step_size(cfg, world))
    return max(1, min(cfg.max_steps, max(cfg.min_steps, passes)))


def step_overrides(steps: int | None, epochs: int | None) -> dict:
    """The [train] values behind `--steps N` (exactly N steps) and `--epochs N` (exactly N passes)."""
    if steps is not None:
        return {"min_steps": steps, "max_steps": steps}
    if epochs is not None:
        return {"epochs": epochs, "min_steps": 0, "max_steps": EPOCHS_FLAG_CEILING}
    return {}


def step_size(cfg: TrainConfig, world: int = 1) -> int:
    """Examples per optimizer step over all processes (the global batch)."""
    return cfg.batch_size * cfg.grad_accum * world


def warmup_steps(cfg: TrainConfig, steps: int) -> int:
    return min(steps - 1, math.ceil(cfg.warmup_ratio * steps)) if steps > 1 else 0


def lr_multiplier(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then linear decay towards 0 at `steps` (step counts from 0)."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (steps - step) / max(1, steps - warmup))


def example_order(n_examples: int, seed: int, start: int, count: int,
                  lengths: list[int] | None = None, micro: int = 1) -> list[int]:
    """Example indices `start .. start+count` of an endless stream of seeded shuffled epochs.

    The order depends only on (seed, position), so a resumed run sees exactly the batches it would have seen.
    With `lengths`, each epoch is length-grouped (see `group_by_length`) into micro-batches of `micro`.
    """
    out: list[int] = []
    position = start
    while len(out) < count:
        epoch, offset = divmod(position, n_examples)
        permutation = list(range(n_examples))
        random.Random(seed * 1_000_003 + epoch).shuffle(permutation)
        if lengths is not None:
            permutation = group_by_length(permutation, lengths, micro, seed * 1_000_003 + epoch)
        take = min(count - len(out), n_examples - offset)
        out.extend(permutation[offset : offset + take])
        position += take
    return out


MEGA_BATCH = 16  # micro-batches per length-sorted window: big enough to find look-alikes, small enough to stay random


def group_by_length(order: list[int], lengths: list[int], micro: int, seed: int) -> list[int]:
    """`order` regrouped so each micro-batch holds examples of similar length (less padding).

    Windows of MEGA_BATCH micro-batches are sorted by length (longest first), cut into micro-batches, and those
    micro-batches are shuffled (seeded) inside the window: still random across the epoch, the same for the same seed.
    """
    micro = max(1, micro)
    window = micro * MEGA_BATCH
    rng = random.Random(seed)
    out: list[int] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: (-lengths[i], i))
        batches = [chunk[k : k + micro] for k in range(0, len(chunk), micro)]
        rng.shuffle(batches)
        out.extend(i for batch in batches for i in batch)
    return out


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into as few rows of at most `capacity` tokens as first-fit needs, balanced so the
    rows come out about equally long (they are padded to the longest row of a forward pass).

    Longest first, each item goes to the emptiest row it fits in; the row count starts at ceil(total / capacity)
    and grows only when nothing fits. An item longer than `capacity` gets a row of its own (examples are cut to
    max_seq_len, so it does not happen). Rows come out fullest first."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = [[] for _ in range(max(1, math.ceil(sum(lengths) / capacity)))] if lengths else []
    used = [0] * len(rows)
    for i in order:
        fits = [r for r in range(len(rows)) if used[r] + lengths[i] <= capacity or not rows[r]]
        if fits:
            r = min(fits, key=lambda r: (used[r], r))
        else:
            rows.append([])
            used.append(0)
            r = len(rows) - 1
        rows[r].append(i)
        used[r] += lengths[i]
    rows = [row for row in rows if row]
    return sorted(rows, key=lambda row: -sum(lengths[i] for i in row))


def free_version(settings: Settings, doc: dict, base_sha256: str) -> str:
    """The next version (see registry.next_version) whose folder does not exist either."""
    version = registry.next_version(doc, base_sha256)
    major, minor, _ = (int(p) for p in version.split("."))
    while (settings.adapters_dir / version).exists():
        minor += 1
        version = f"{major}.{minor}.0"
    return version


def topk_kl(ref_logp, ref_ids, tuned_logp):
    """KL(base || tuned) per position, with the base's distribution kept as its top-k tokens plus one bucket for
    the rest: sum_k p_k (log p_k - log q_k) + p_rest (log p_rest - log q_rest). Exact for that coarser
    distribution, and the base's side is stored once instead of recomputed every step.

    ref_logp, ref_ids: (N, K) base log-probabilities and token ids; tuned_logp: (N, V) the tuned model's."""
    import torch

    tuned_top = tuned_logp.gather(-1, ref_ids)
    base_top = ref_logp.exp()
    head = (base_top * (ref_logp - tuned_top)).sum(-1)
    base_rest = (1.0 - base_top.sum(-1)).clamp(min=1e-6)
    tuned_rest = (1.0 - tuned_top.exp().sum(-1)).clamp(min=1e-6)
    return head + base_rest * (torch.log(base_rest) - torch.log(tuned_rest))


def shard(items: list, rank: int, world: int) -> list:
    """This process's contiguous share of a global step (every share non-empty when len(items) >= world)."""
    per, extra = divmod(len(items), world)
    start = rank * per + min(rank, extra)
    return items[start : start + per + (1 if rank < extra else 0)]


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
    return {i for i, (a, b) in enumerate(encoded["offset_mapping"]) if any(a < end and b > begin for begin, end in spans)}


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


def final_window(values: list[float], window: int) -> float | None:
    """Mean of the last `window` values (the training loss over about one pass over the data)."""
    if not values:
        return None
    tail = values[-max(1, window) :]
    return sum(tail) / len(tail)


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


# --- batches ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Batch:
    """One forward pass: ids/labels (rows, L); `mask` is the usual 2D padding mask, or for packed rows a 4D
    (rows, 1, L, L) block-diagonal causal mask (with sdpa, restarting position ids alone leak attention across
    examples); `token_weights` carries each example's loss weight on its own positions."""

    ids: Any
    mask: Any
    labels: Any
    token_weights: Any
    position_ids: Any = None
    real_tokens: int = 0
    padded_tokens: int = 0  # pad positions computed on (the waste)
    reference: Any = None  # rehearsal targets: KlTargets, or None
    sequences: Any = None  # answers whose summed log-prob a preference term needs: SequenceTargets, or None


@dataclasses.dataclass
class KlTargets:
    """The frozen base's next-token distributions for the rehearsal examples of a batch: at flat position
    `at[i]` (row * L + position of the predicted token) the base's top-k token ids and log-probabilities."""

    at: Any
    ids: Any
    logp: Any


def _reference_targets(placed: list[tuple[int, int, dict]], length: int, device) -> KlTargets | None:
    """KlTargets of the rehearsal examples among `placed` (row, offset, example)."""
    import torch

    at, ids, logp = [], [], []
    for row, offset, example in placed:
        if "ref_ids" not in example:
            continue
        positions = [offset + j for j, t in enumerate(example["labels"]) if t != IGNORE_INDEX]
        at.append(torch.tensor([row * length + p for p in positions], dtype=torch.long))
        ids.append(example["ref_ids"])
        logp.append(example["ref_logp"])
    if not at:
        return None
    return KlTargets(torch.cat(at).to(device), torch.cat(ids).to(device), torch.cat(logp).float().to(device))


@dataclasses.dataclass
class SequenceTargets:
    """The answers of a batch that a preference term scores: flat positions `at` of their labelled tokens,
    `seq[i]` the answer each position belongs to, `sft` whether that position is also an SFT target, and
    `items` the examples themselves (in answer order) with their term and reference log-prob."""

    at: Any
    seq: Any
    sft: Any
    items: list


def _sequence_targets(placed: list[tuple[int, int, dict]], length: int, device) -> SequenceTargets | None:
    import torch

    at, seq, sft, items = [], [], [], []
    for row, offset, example in placed:
        if "pref_term" not in example:
            continue
        positions = [offset + j for j, t in enumerate(example["labels"]) if t != IGNORE_INDEX and j > 0]
        at.append(torch.tensor([row * length + p for p in positions], dtype=torch.long))
        seq.append(torch.full((len(positions),), len(items), dtype=torch.long))
        sft.append(torch.full((len(positions),), example["pref_term"] in preference.SFT_TERMS, dtype=torch.bool))
        items.append(example)
    if not items:
        return None
    return SequenceTargets(torch.cat(at).to(device), torch.cat(seq).to(device), torch.cat(sft).to(device), items)


def collate_padded(batch: list[dict], pad_id: int, device=None) -> Batch:
    """Rows padded on the right to the longest example of the batch."""
    import torch

    length = max(len(e["input_ids"]) for e in batch)
    ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), length), dtype=torch.long)
    for row, example in enumerate(batch):
        n = len(example["input_ids"])
        ids[row, :n] = torch.tensor(example["input_ids"])
        labels[row, :n] = torch.tensor(example["labels"])
        mask[row, :n] = 1
    weights = torch.tensor([0.0 if "ref_ids" in e else e["weight"] for e in batch], dtype=torch.float32)
    real = int(mask.sum())
    placed = [(row, 0, e) for row, e in enumerate(batch)]
    return Batch(ids.to(device), mask.to(device), labels.to(device), weights[:, None].expand(-1, length).to(device),
                 real_tokens=real, padded_tokens=ids.numel() - real,
                 reference=_reference_targets(placed, length, device),
                 sequences=_sequence_targets(placed, length, device))


def collate_packed(rows: list[list[dict]], pad_id: int, device=None) -> Batch:
    """Several examples per row, back to back: position ids restart at 0 for each example, the 4D mask lets a token
    see only earlier tokens of its own example, labels stay -100 on every example's first token, so no loss or
    attention crosses a boundary. Pad positions (shorter rows) attend only to themselves."""
    import torch

    length = max(sum(len(e["input_ids"]) for e in row) for row in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(rows), length), dtype=torch.long)
    segments = torch.full((len(rows), length), -1, dtype=torch.long)
    weights = torch.zeros((len(rows), length), dtype=torch.float32)
    placed = []
    for r, row in enumerate(rows):
        at = 0
        for k, example in enumerate(row):
            n = len(example["input_ids"])
            ids[r, at : at + n] = torch.tensor(example["input_ids"])
            labels[r, at : at + n] = torch.tensor(example["labels"])
            labels[r, at] = IGNORE_INDEX
            positions[r, at : at + n] = torch.arange(n)
            segments[r, at : at + n] = k
            weights[r, at : at + n] = 0.0 if "ref_ids" in example else example["weight"]
            placed.append((r, at, example))
            at += n
    real = int((segments >= 0).sum())
    pads = segments < 0
    segments[pads] = -1 - torch.arange(length).expand(len(rows), -1)[pads]  # each pad position its own segment
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    mask = (segments[:, :, None] == segments[:, None, :]) & causal
    return Batch(ids.to(device), mask[:, None].to(device), labels.to(device), weights.to(device), positions.to(device),
                 real_tokens=real, padded_tokens=ids.numel() - real,
                 reference=_reference_targets(placed, length, device),
                 sequences=_sequence_targets(placed, length, device))


def loss_positions(labels):
    """Positions whose logits predict a labelled token in some row (p predicts p+1): the only logits worth computing.
    The lm_head over a 49k vocabulary is a fifth of SmolLM2's forward; prompts need none of it."""
    needed = (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().flatten()
    return needed if len(needed) else labels.new_zeros(1)


# --- the recipe -------------------------------------------------------------------------------------------------
class Trainer:
    """One training run. `setup()` -> `train()` -> `save()` -> `register()`; `cleanup()` always."""

    def __init__(
        self,
        settings: Settings,
        snapshot_id: str | None = None,
        fresh: bool = False,
        resume: bool = False,
        note: str | None = None,
        progress: Progress | None = None,
    ):
        self.settings = settings
        self.cfg: TrainConfig = settings.train
        self.snapshot_id = snapshot_id
        self.fresh = fresh
        self.resume = resume
        self.note = note
        self._progress = progress
        # filled by setup()
        self.base: BaseModel | None = None
        self.snapshot: dict | None = None
        self.snapshot_sha256: str | None = None
        self.version: str | None = None
        self.run_dir: Path | None = None
        self.parent: str | None = None
        self.warm_start: dict = {"from": None}
        self.model = None
        self.tokenizer = None
        self.optimizer = None
        self.scheduler = None
        self.examples: list[dict] = []
        self.records = 0  # distinct snapshot records behind `examples` (each may be there under several prompts)
        self.anchors: list[dict] = []  # rehearsal: everyday prompts with the base model's answers (kl)
        self.eval_examples: list[dict] = []
        self.undesirable: list[dict] = []  # answers rated unhelpful (and, with objective kto, corrections' rejected)
        self.undesirable_records = 0
        self.objective: dict = preference.resolve_objective("sft", 0, 0)
        self.preference_eval: dict = {}  # answers whose log-likelihood is reported: {"rejected", "chosen", "source"}
        self.steps = 0
        self.start_step = 0
        self.step = 0
        self.history: list[dict] = []  # metrics rows of this run (restored ones included on resume)
        self.metrics: dict = {}
        self.timings: dict[str, float] = {}
        self.warnings: list[str] = []
        self.created_at = utc_now()
        self.final_dir: Path | None = None
        # data-parallel: set by setup() when launched by torchrun / accelerate (WORLD_SIZE > 1)
        self.world = 1
        self.rank = 0
        self.accelerator = None
        self._train_model = None  # the model the loop calls: DDP-wrapped when world > 1
        self._lengths: list[int] = []

    @property
    def is_main(self) -> bool:
        """Only this process writes the run folder, metrics, adapter and registry, and reports progress."""
        return self.rank == 0

    # -- helpers ---------------------------------------------------------------------------------------------------
    def _emit(self, event: str, **data: Any) -> None:
        if self._progress is not None and self.is_main:
            self._progress({"event": event, **data})

    def _warn(self, message: str) -> None:
        self.warnings.append(message)
        self._emit("warning", message=message)

    def _rehearsal(self) -> list[dict]:
        from .rehearsal import rehearsal_records

        if self.settings.train.rehearsal_examples > 0:
            self._emit("status", message="preparing rehearsal examples (the base model's own everyday answers)")
        return rehearsal_records(self.settings, self.base)

    @property
    def device(self):
        return self.model.device

    # -- setup -----------------------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Validate, resolve snapshot and base, load and wrap the model, build optimizer and schedule."""
        started = time.perf_counter()
        validate_train_config(self.cfg)
        quiet_known_warnings()  # before anything imports bitsandbytes
        self._init_distributed()
        if self.cfg.load_in_4bit:
            import importlib.util

            if importlib.util.find_spec("bitsandbytes") is None:
                raise ConfigError("train.load_in_4bit needs bitsandbytes, which is not installed", "pip install bitsandbytes, or train with --no-4bit")
        doc = registry.load(self.settings)
        run_state = self._find_partial_run() if self.resume else None
        if run_state is not None:
            self._adopt_run_state(run_state)
        self.snapshot = self._resolve_snapshot(doc)
        train_path = self._snapshot_path("file")  # checks the file against its registered sha256
        if run_state is not None and run_state["snapshot"].get("sha256") not in (None, self.snapshot_sha256):
            raise TrainingFailed(
                f"snapshot {self.snapshot['id']} changed since the interrupted run in {self.run_dir.name} was started",
                "start a new run with 'cl train' (without --resume)",
            )
        set_threads(self.settings)
        self.base = resolve_base(self.settings)
        if run_state is not None and run_state["base_model"]["sha256"] != self.base.sha256:
            raise TrainingFailed(
                f"the base model changed since the interrupted run in {self.run_dir.name} was started",
                "start a new run with 'cl train' (without --resume)",
            )

        self._emit("status", message=f"tokenizing snapshot {self.snapshot['id']}")
        self.tokenizer = load_tokenizer(self.base)
        records, unreadable = load_examples(train_path)
        if self.cfg.rehearsal == "sft":
            records += self._rehearsal()
        prompts = system_prompts(self.settings.chat.system_prompt, self.cfg.vary_system_prompt)
        tokenized, skipped = tokenize_examples(self.tokenizer, records, self.cfg.max_seq_len, prompts)
        self._assign_preference_terms(tokenized)
        self.records = len({e["record"] for e in self.examples})
        self.undesirable_records = len({e["record"] for e in self.undesirable})
        if self.cfg.rehearsal == "kl":
            self.anchors, _ = tokenize_examples(self.tokenizer, self._rehearsal(), self.cfg.max_seq_len, prompts[:2])
        if unreadable or skipped:
            self._warn(f"skipped {unreadable + skipped} unusable line(s) of snapshot {self.snapshot['id']}")
        if not self.examples and not self.undesirable:
            raise InputError(
                f"snapshot {self.snapshot['id']} has no trainable example (each needs a user turn and a final "
                f"assistant answer; with train.objective={self.cfg.objective}, answers rated unhelpful teach nothing)",
                "curate again with 'cl curate', pick another with --snapshot, or use train.objective=auto",
            )
        eval_path = self._snapshot_path("eval_file")
        eval_records = load_examples(eval_path)[0] if eval_path is not None and eval_path.exists() else []
        held_out, _ = tokenize_examples(self.tokenizer, eval_records, self.cfg.max_seq_len,
                                        self.settings.chat.system_prompt)
        self.eval_examples = [e for e in held_out if e["role"] != preference.UNDESIRABLE]
        self.preference_eval = self._preference_eval_sets(held_out, records)
        self._lengths = [len(e["input_ids"]) for e in self.examples]
        # the "no" answers ride beside the SFT examples (as many per step), so they never take steps from them
        self.steps = total_steps(self.cfg, max(self.records, self.undesirable_records), self.world)

        if run_state is None:
            self.parent, warm_dir = self._warm_start_source(doc)
            self.version = free_version(self.settings, doc, self.base.sha256)
        else:
            needs_parent = run_state.get("parent") and self._checkpoint_dir() is None
            warm_dir = self._champion_dir_for(run_state["parent"], doc) if needs_parent else None
        self.timings["prepare_s"] = time.perf_counter() - started

        self._load_model(warm_dir)
        self._attach_reference()
        self._attach_preference_reference()
        self._build_optimizer()
        if run_state is None:
            self._start_run_dir()
        else:
            self._load_checkpoint()
        self._wrap_for_processes()
        self.timings["setup_s"] = time.perf_counter() - started

    def _init_distributed(self) -> None:
        """Join the process group when a launcher (torchrun, accelerate launch) started several processes."""
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return
        import torch
        from accelerate import Accelerator

        self.accelerator = Accelerator(cpu=not torch.cuda.is_available())  # gloo on CPU, NCCL on GPUs
        self.world = self.accelerator.num_processes
        self.rank = self.accelerator.process_index
        if self.accelerator.distributed_type.name not in ("MULTI_CPU", "MULTI_GPU", "NO"):
            raise ConfigError(
                f"'cl train' runs data-parallel (DDP) only; this launch asked for {self.accelerator.distributed_type.name}",
                "launch with torchrun or 'cl train --num-processes N'; for FSDP + QLoRA see accelerate_fsdp_qlora.yaml's notes",
            )

    def _wrap_for_processes(self) -> None:
        """DDP over the LoRA weights (the frozen 4-bit base is not synchronised: every rank loads the same one)."""
        self._train_model = self.model
        if self.world == 1:
            return
        from torch.nn.parallel import DistributedDataParallel

        device = self.model.device
        try:
            self._train_model = DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False,
            )
        except Exception as exc:  # noqa: BLE001 - turned into one clear line
            raise TrainingFailed(
                f"cannot wrap the model for {self.world} processes: {type(exc).__name__}: {exc}",
                "train with --no-4bit (full-precision LoRA), or with --num-processes 1",
            ) from exc
        self.accelerator.wait_for_everyone()  # rank 0 has created the run folder

    def _resolve_snapshot(self, doc: dict) -> dict:
        if self.snapshot_id:
            return registry.find_snapshot(doc, self.snapshot_id)
        snapshot = registry.latest_snapshot(doc)
        if snapshot is None:
            raise NothingToDo("there is no curated snapshot to train on", "run 'cl curate' first")
        self.snapshot_id = snapshot["id"]
        return snapshot

    def _snapshot_path(self, key: str) -> Path | None:
        relative = self.snapshot.get(key)
        if not relative:
            if key == "file":
                raise InputError(f"snapshot {self.snapshot['id']} names no file", "curate again with 'cl curate'")
            return None
        path = registry.confined(self.settings, relative)
        if key == "file":
            if not path.exists():
                raise InputError(f"snapshot file {relative} is missing", "curate again with 'cl curate'")
            self.snapshot_sha256 = file_sha256(path)
            expected = self.snapshot.get("sha256")
            if expected and expected != self.snapshot_sha256:
                raise InputError(
                    f"snapshot file {relative} changed since it was registered (sha256 mismatch)",
                    "curate a new snapshot with 'cl curate'",
                )
        return path

    def _champion_dir_for(self, version: str, doc: dict) -> Path:
        entry = doc["adapters"].get(version)
        if entry is None:
            raise TrainingFailed(f"the parent adapter {version} of this run is no longer registered", "start over with 'cl train --fresh'")
        folder = registry.confined(self.settings, entry["path"])
        for name, digest in (entry.get("sha256") or {}).items():
            path = folder / name
            if not path.exists() or file_sha256(path) != digest:
                raise TrainingFailed(
                    f"adapter {version} at {entry['path']} does not match its registered sha256 ({name})",
                    "train from the base model with 'cl train --fresh', or roll back to a sound champion",
                )
        return folder

    def _warm_start_source(self, doc: dict) -> tuple[str | None, Path | None]:
        """The champion to start from, or (None, None) for a fresh adapter (with the reason recorded)."""
        champion = registry.champion_entry(doc)
        if self.fresh or champion is None:
            self.warm_start = {"from": None, "reason": "--fresh" if self.fresh else "no champion"}
            return None, None
        version = doc["champion"]
        if champion.get("base_model", {}).get("sha256") != self.base.sha256:
            self._warn(f"champion {version} was trained on another base model: starting a fresh adapter")
            self.warm_start = {"from": None, "reason": f"champion {version} has another base model"}
            return None, None
        folder = self._champion_dir_for(version, doc)
        config = read_json(folder / "adapter_config.json", default={}) or {}
        mismatch = []
        if config.get("r") != self.cfg.lora_r:
            mismatch.append(f"rank {config.get('r')} != {self.cfg.lora_r}")
        if config.get("lora_alpha") != self.cfg.lora_alpha:
            mismatch.append(f"alpha {config.get('lora_alpha')} != {self.cfg.lora_alpha}")
        wanted = target_modules(self.cfg)
        if wanted != "all-linear" and set(wanted) != set(config.get("target_modules") or []):
            mismatch.append("target modules differ")
        if mismatch:
            self._warn(f"champion {version} has another LoRA shape ({', '.join(mismatch)}): starting a fresh adapter")
            self.warm_start = {"from": None, "reason": f"champion {version} LoRA shape differs: {', '.join(mismatch)}"}
            return None, None
        self.warm_start = {"from": version}
        return version, folder

    def _load_model(self, warm_dir: Path | None) -> None:
        import torch
        from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

        torch.manual_seed(self.cfg.seed)
        self._emit("status", message=f"loading {self.base.name} ({'4-bit NF4' if self.cfg.load_in_4bit else 'full precision'})")
        started = time.perf_counter()
        model = load_model(self.base, load_in_4bit=self.cfg.load_in_4bit, for_training=True)
        self.timings["load_base_s"] = time.perf_counter() - started
        model.config.use_cache = False
        checkpointing_kwargs = {"use_reentrant": False}
        if self.cfg.load_in_4bit:  # freezes the base, upcasts norms/embeddings to fp32 (~0.03 s, +~150 MB for SmolLM2)
            kbit_started = time.perf_counter()
            model = prepare_model_for_kbit_training(
                model,
                use_gradient_checkpointing=self.cfg.gradient_checkpointing,
                gradient_checkpointing_kwargs=checkpointing_kwargs,
            )
            self.timings["prepare_kbit_s"] = time.perf_counter() - kbit_started
        else:
            for param in model.parameters():
                param.requires_grad_(False)
            if self.cfg.gradient_checkpointing:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing_kwargs)
        resume_dir = self._checkpoint_dir() if self.resume else None
        source = resume_dir if resume_dir is not None else warm_dir
        if source is not None:
            model = PeftModel.from_pretrained(model, str(source), is_trainable=True)
        else:
            model = get_peft_model(
                model,
                LoraConfig(
                    r=self.cfg.lora_r,
                    lora_alpha=self.cfg.lora_alpha,
                    lora_dropout=self.cfg.lora_dropout,
                    target_modules=target_modules(self.cfg),
                    bias="none",
                    task_type="CAUSAL_LM",
                ),
            )
        if source is not None and self.cfg.lora_dropout != model.peft_config["default"].lora_dropout:
            self._set_dropout(model, self.cfg.lora_dropout)
        if not any(p.requires_grad for p in model.parameters()):
            raise TrainingFailed("no trainable LoRA parameters", "check train.target_modules against the model's layer names")
        model.train()
        self.model = model
        self.timings["model_s"] = time.perf_counter() - started  # base load + k-bit preparation + LoRA
        self._uses_logits_to_keep = _accepts_logits_to_keep(model)
        self._autocast = self.cfg.load_in_4bit or model.device.type == "cuda"

    def _attach_reference(self) -> None:
        """Give each rehearsal example the frozen base's top-k next-token distributions on its answer, computed
        with the adapter disabled (the same 4-bit or full-precision base the adapter trains on) and cached per
        base model, so later runs do not compute them again."""
        if not self.anchors:
            return
        import hashlib

        import torch

        key = hashlib.sha256(orjson.dumps([self.base.sha256, self.cfg.load_in_4bit, REFERENCE_TOP_K,
                                           [a["input_ids"] for a in self.anchors]])).hexdigest()[:20]
        cache = self.settings.model_cache / f"rehearsal-reference-{key}.pt"
        if cache.is_file():
            reference = torch.load(cache, weights_only=True)
        else:
            self._emit("status", message=f"measuring the base model on {len(self.anchors)} rehearsal prompts (once)")
            reference = self._measure_reference()
            if self.is_main:
                ensure_dir(cache.parent)
                tmp = cache.with_name(f".{cache.name}.{os.getpid()}.cl-tmp")
                torch.save(reference, tmp)
                os.replace(tmp, cache)
        for anchor, (ids, logp) in zip(self.anchors, zip(reference["ids"], reference["logp"])):
            anchor["ref_ids"], anchor["ref_logp"] = ids.long(), logp

    def _assign_preference_terms(self, tokenized: list[dict]) -> None:
        """Split the snapshot's examples into SFT examples and undesirable ones, and mark what each preference term
        (from train.objective and the data) scores: KTO on desirable and undesirable answers, DPO on pairs."""
        from .preference import DPO_CHOSEN, DPO_REJECTED, KTO_DESIRABLE, KTO_UNDESIRABLE, UNDESIRABLE

        undesirable = [e for e in tokenized if e["role"] == UNDESIRABLE]
        examples = [e for e in tokenized if e["role"] != UNDESIRABLE]
        pairs = len({e["record"] for e in examples if "rejected" in e})
        unpaired = len({e["record"] for e in undesirable})
        self.objective = preference.resolve_objective(self.cfg.objective, unpaired, pairs)
        if self.objective["ignored"]:
            self._warn(f"train.objective={self.cfg.objective}: {self.objective['ignored']} answer(s) rated unhelpful "
                       "or corrected are not learned from as 'no' (train.objective=auto uses them)")
        for example in examples:
            rejected = example.pop("rejected", None)
            if rejected is not None and self.objective["dpo"]:
                example["pref_term"] = DPO_CHOSEN
                example["rejected_item"] = {**rejected, "id": example["id"], "record": example["record"],
                                            "weight": 0.0, "pref_term": DPO_REJECTED}
            elif self.objective["kto"]:
                example["pref_term"] = KTO_DESIRABLE
                if rejected is not None and self.objective["pairs_as_kto"]:
                    undesirable.append({**rejected, "id": example["id"], "record": example["record"],
                                        "weight": 1.0, "role": UNDESIRABLE})
        for item in undesirable:  # their SFT weight becomes the weight of their KTO term: they are never imitated
            item.update(pref_term=KTO_UNDESIRABLE, pref_weight=item["weight"], weight=0.0)
        self.examples, self.undesirable = examples, undesirable if self.objective["kto"] else []

    def _preference_eval_sets(self, held_out: list[dict], records: list[dict]) -> dict:
        """The rejected and the chosen/desirable answers whose mean per-token log-likelihood the run reports: the
        held-out ones, or (when none of the snapshot's rejected answers was held out) the trained ones."""

        def sets(examples: list[dict]) -> tuple[list[dict], list[dict]]:
            rejected = [e for e in examples if e["role"] == preference.UNDESIRABLE]
            rejected += [e["rejected"] for e in examples if "rejected" in e]
            return rejected, [e for e in examples if e["role"] != preference.UNDESIRABLE]

        rejected, chosen = sets(held_out)
        source = "held_out"
        if not rejected:
            snapshot_records = [r for r in records if r.get("kind") != "rehearsal"]  # what evaluate reads too
            trained, _ = tokenize_examples(self.tokenizer, snapshot_records, self.cfg.max_seq_len,
                                           self.settings.chat.system_prompt)
            rejected, chosen = sets(trained)
            source = "train"
        return {"rejected": rejected, "chosen": chosen, "source": source} if rejected else {}

    def _attach_preference_reference(self) -> None:
        """The frozen base's summed log-prob of every answer a preference term scores, measured once per run with
        the adapter disabled (no second model in memory)."""
        items = [e for e in self.examples if "pref_term" in e]
        items += [e["rejected_item"] for e in self.examples if "rejected_item" in e] + self.undesirable
        if not items:
            return
        import torch

        self._emit("status", message=f"measuring the base model on {len(items)} preference answer(s) (once)")
        started = time.perf_counter()
        with torch.no_grad(), self.model.disable_adapter():  # train mode: keeps bitsandbytes' training layout
            for start in range(0, len(items), 8):
                chunk = items[start : start + 8]
                batch = collate_padded([{**e, "weight": 1.0} for e in chunk], self._pad_id(), self.device)
                losses, _, _, _, _ = self._forward_losses(self.model, batch.ids, batch.mask, batch.labels)
                for row, item in enumerate(chunk):
                    item["ref_logp"] = -float(losses[row].sum())
                    item["tokens"] = sum(1 for j, t in enumerate(item["labels"]) if t != IGNORE_INDEX and j > 0)
        self.timings["preference_reference_s"] = time.perf_counter() - started

    def _step_preference_plan(self, examples: list[dict], undesirable: list[dict]) -> tuple[int, tuple[float, float]]:
        """How many preference terms this process's step holds, and KTO's class weights for its counts."""
        desirable = sum(1 for e in examples if e.get("pref_term") == preference.KTO_DESIRABLE)
        pairs = sum(1 for e in examples if e.get("pref_term") == preference.DPO_CHOSEN)
        return desirable + pairs + len(undesirable), preference.kto_class_weights(desirable, len(undesirable))

    def step_undesirable(self, step: int) -> list[dict]:
        """This process's undesirable answers for step `step`: as many as its SFT examples (a seeded stream)."""
        if not self.undesirable:
            return []
        count = self.cfg.batch_size * self.cfg.grad_accum
        start = (step * self.world + self.rank) * count
        order = example_order(len(self.undesirable), self.cfg.seed + 104729, start, count)
        return [self.undesirable[i] for i in order]

    def preference_logliks(self) -> dict:
        """Mean per-token log-likelihood (nats) of the rejected and of the chosen/desirable answers in
        `preference_eval`, each answer's mean first (as a user would see each answer), then their mean."""
        if not self.preference_eval:
            return {}
        import torch

        was_training = self.model.training
        self.model.eval()
        _keep_bnb_training_layout(self.model)
        out = {}
        try:
            with torch.no_grad():
                for name in ("rejected", "chosen"):
                    values = []
                    examples = self.preference_eval[name]
                    for start in range(0, len(examples), 8):
                        chunk = [{**e, "weight": 1.0} for e in examples[start : start + 8]]
                        ids, mask, labels, _ = self._collate(chunk)
                        losses, labelled = self.token_losses(ids, mask, labels)
                        values += (-(losses.sum(-1)) / labelled.sum(-1).clamp(min=1)).tolist()
                    out[f"{name}_loglik"] = preference.mean_loglik(values)
        finally:
            if was_training:
                self.model.train()
        out.update(preference_eval=self.preference_eval["source"],
                   rejected_answers=len(self.preference_eval["rejected"]),
                   chosen_answers=len(self.preference_eval["chosen"]))
        return out

    def _measure_reference(self) -> dict:
        import torch

        ids_out, logp_out = [], []
        model = self.model
        with torch.no_grad(), model.disable_adapter():  # train mode: keeps bitsandbytes' training layout
            for start in range(0, len(self.anchors), 8):
                chunk = self.anchors[start : start + 8]
                batch = collate_padded([{**a, "weight": 1.0} for a in chunk], self._pad_id(), self.device)
                needed = loss_positions(batch.labels)
                kwargs = {"logits_to_keep": needed} if self._uses_logits_to_keep else {}
                with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self._autocast):
                    logits = model(input_ids=batch.ids, attention_mask=batch.mask, use_cache=False, **kwargs).logits
                logits = logits.float() if logits.shape[1] == len(needed) else logits[:, needed].float()
                logp = torch.log_softmax(logits, dim=-1)
                for row, anchor in enumerate(chunk):
                    columns = torch.tensor([j - 1 for j, t in enumerate(anchor["labels"]) if t != IGNORE_INDEX])
                    top = logp[row, torch.searchsorted(needed, columns)].topk(REFERENCE_TOP_K, dim=-1)
                    ids_out.append(top.indices.to(torch.int32).cpu())
                    logp_out.append(top.values.to(torch.float16).cpu())
        return {"ids": ids_out, "logp": logp_out}

    @staticmethod
    def _set_dropout(model, p: float) -> None:
        import torch

        model.peft_config["default"].lora_dropout = p
        for module in model.modules():
            dropouts = getattr(module, "lora_dropout", None)
            if isinstance(dropouts, torch.nn.ModuleDict) and "default" in dropouts:
                dropouts["default"] = torch.nn.Dropout(p) if p > 0 else torch.nn.Identity()

    def _build_optimizer(self) -> None:
        import torch

        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=self.cfg.learning_rate, weight_decay=self.cfg.weight_decay)
        warmup = warmup_steps(self.cfg, self.steps)
        steps = self.steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_multiplier(s, steps, warmup))

    # -- run folder, checkpoints, resume ---------------------------------------------------------------------------
    def _partial_dir(self, version: str) -> Path:
        return self.settings.adapters_dir / f".{version}{PARTIAL_SUFFIX}"

    def _partial_runs(self) -> list[Path]:
        folder = self.settings.adapters_dir
        if not folder.exists():
            return []
        runs = [p for p in folder.glob(f".*{PARTIAL_SUFFIX}") if p.is_dir() and (p / RUN_FILE).exists()]
        return sorted(runs, key=lambda p: p.stat().st_mtime)

    def _find_partial_run(self) -> dict:
        runs = self._partial_runs()
        if not runs:
            raise NothingToDo("there is no interrupted training run to resume", "start one with 'cl train'")
        self.run_dir = runs[-1]
        state = read_json(self.run_dir / RUN_FILE)
        return state

    def _adopt_run_state(self, state: dict) -> None:
        """A resumed run keeps its own snapshot, hyperparameters, version and parent; flags that differ are ignored."""
        saved = TrainConfig(**state["train"])
        ignored = [f.name for f in dataclasses.fields(TrainConfig) if getattr(saved, f.name) != getattr(self.cfg, f.name)]
        if ignored:
            self._warn(f"--resume keeps the interrupted run's settings; ignored: {', '.join(ignored)}")
        if self.snapshot_id and self.snapshot_id != state["snapshot"]["id"]:
            self._warn(f"--resume continues on snapshot {state['snapshot']['id']}; --snapshot ignored")
        self.settings = dataclasses.replace(self.settings, train=saved)
        self.cfg = saved
        self.snapshot_id = state["snapshot"]["id"]
        self.version = state["version"]
        self.parent = state.get("parent")
        self.warm_start = state.get("warm_start") or {"from": self.parent}
        self.note = self.note or state.get("note")
        self.created_at = state.get("created_at", self.created_at)
        if state.get("eval_loss_start") is not None:
            self.metrics["eval_loss_start"] = state["eval_loss_start"]
        start = state.get("preference_start") or {}
        if start.get("rejected_loglik_start") is not None:
            self.metrics.update(start)
        if self.fresh:
            self._warn("--fresh is ignored with --resume")

    def _start_run_dir(self) -> None:
        if not self.is_main:
            self.run_dir = self._partial_dir(self.version)
            return
        adapters = ensure_dir(self.settings.adapters_dir)
        for stale in self._partial_runs():
            self._warn(f"discarding the earlier unfinished run {stale.name} ('cl train --resume' would have continued it)")
            shutil.rmtree(stale, ignore_errors=True)
        self.run_dir = self._partial_dir(self.version)
        shutil.rmtree(self.run_dir, ignore_errors=True)
        ensure_dir(self.run_dir)
        assert self.run_dir.parent == adapters
        atomic_write_json(self.run_dir / RUN_FILE, self._run_state())

    def _run_state(self) -> dict:
        return {
            "version": self.version,
            "snapshot": {"id": self.snapshot["id"], "sha256": self.snapshot_sha256},
            "base_model": {"name": self.base.name, "sha256": self.base.sha256},
            "parent": self.parent,
            "warm_start": self.warm_start,
            "train": dataclasses.asdict(self.cfg),
            "note": self.note,
            "created_at": self.created_at,
            "eval_loss_start": self.metrics.get("eval_loss_start"),
            "preference_start": {k: self.metrics.get(k) for k in ("rejected_loglik_start", "chosen_loglik_start")},
        }

    def _checkpoint_dir(self) -> Path | None:
        if self.run_dir is None:
            return None
        for name in (CHECKPOINT_DIR, CHECKPOINT_DIR + ".old"):  # .old survives a crash in the middle of a swap
            folder = self.run_dir / name
            if (folder / TRAINER_STATE).exists() and (folder / "adapter_config.json").exists():
                return folder
        return None

    def save_checkpoint(self) -> None:
        import torch

        tmp = self.run_dir / f"{CHECKPOINT_DIR}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.save_pretrained(str(tmp))
        state = {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }
        torch.save(state, tmp / TRAINER_STATE)
        current, old = self.run_dir / CHECKPOINT_DIR, self.run_dir / f"{CHECKPOINT_DIR}.old"
        shutil.rmtree(old, ignore_errors=True)
        if current.exists():
            os.replace(current, old)
        os.replace(tmp, current)
        shutil.rmtree(old, ignore_errors=True)

    def _load_checkpoint(self) -> None:
        import torch

        folder = self._checkpoint_dir()
        rows = [r for _, r in iter_jsonl(self.run_dir / "metrics.jsonl")]
        if self.is_main:
            (self.run_dir / FAILED_FILE).unlink(missing_ok=True)
        if folder is None:  # interrupted before the first checkpoint: start the same run again from step 0
            self._warn(f"{self.run_dir.name} has no checkpoint yet: restarting it from step 0")
            if self.is_main:
                atomic_write_jsonl(self.run_dir / "metrics.jsonl", [])
            return
        state = torch.load(folder / TRAINER_STATE, map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.start_step = self.step = int(state["step"])
        self.history = [r for r in rows if r.get("step", 0) <= self.start_step]
        if self.is_main:
            atomic_write_jsonl(self.run_dir / "metrics.jsonl", self.history)  # steps after the checkpoint are redone
        self._emit("status", message=f"resuming {self.run_dir.name} at step {self.start_step}/{self.steps}")

    def mark_failed(self, reason: str) -> None:
        if self.is_main and self.run_dir is not None and self.run_dir.exists():
            atomic_write_json(self.run_dir / FAILED_FILE, {"reason": reason, "step": self.step, "steps": self.steps, "at": utc_now()})

    # -- training --------------------------------------------------------------------------------------------------
    def _collate(self, batch: list[dict]):
        """(ids, mask, labels, weights) of padded rows: held-out loss and the tests use it."""
        b = collate_padded(batch, self._pad_id(), self.device)
        return b.ids, b.mask, b.labels, b.token_weights[:, 0]

    def _pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def token_losses(self, ids, mask, labels, position_ids=None):
        """Per-token cross-entropy (fp32) of the labelled positions, shape (batch, positions), 0 where unlabelled."""
        losses, labelled, _, _, _ = self._forward_losses(self.model, ids, mask, labels, position_ids)
        return losses, labelled

    def _forward_losses(self, model, ids, mask, labels, position_ids=None, reference: KlTargets | None = None,
                        sequences: SequenceTargets | None = None):
        """(losses, labelled, target positions, KL sum, answer log-probs): logits only where some row has a
        labelled next token. Rehearsal positions (`reference`) give a KL term toward the base instead of a
        cross-entropy; `sequences` get their summed log-probs, and those only pushed down leave the SFT loss."""
        import torch

        needed = loss_positions(labels)
        kwargs = {"logits_to_keep": needed} if self._uses_logits_to_keep else {}
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self._autocast):
            out = model(input_ids=ids, attention_mask=mask, use_cache=False, **kwargs)
        logits = out.logits.float()
        if logits.shape[1] != len(needed):
            logits = logits[:, needed]
        targets = labels[:, needed + 1]
        labelled = targets != IGNORE_INDEX
        logp = torch.log_softmax(logits, dim=-1)
        losses = -logp.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1) * labelled
        kl = None
        if reference is not None:
            rows, predicted = reference.at // labels.shape[1], reference.at % labels.shape[1]
            column = torch.searchsorted(needed + 1, predicted)
            kl = topk_kl(reference.logp, reference.ids, logp[rows, column]).sum()
            labelled = labelled.clone()
            labelled[rows, column] = False  # rehearsal tokens are not trained on as targets
            losses = losses * labelled
        sequence_logp = None
        if sequences is not None:
            rows, predicted = sequences.at // labels.shape[1], sequences.at % labels.shape[1]
            column = torch.searchsorted(needed + 1, predicted)
            token_logp = -losses[rows, column]
            sequence_logp = token_logp.new_zeros(len(sequences.items)).index_add(0, sequences.seq, token_logp)
            labelled = labelled.clone()
            labelled[rows[~sequences.sft], column[~sequences.sft]] = False
            losses = losses * labelled
        return losses, labelled, needed + 1, kl, sequence_logp

    def batch_losses(self, batch: Batch, model=None):
        """(per-token losses, labelled mask, per-token weights, rehearsal KL sum or None) of one Batch."""
        return self.batch_terms(batch, model)[:4]

    def batch_terms(self, batch: Batch, model=None):
        """batch_losses plus the summed log-probs of the batch's preference answers (None without any)."""
        model = self.model if model is None else model
        losses, labelled, targets, kl, sequence_logp = self._forward_losses(
            model, batch.ids, batch.mask, batch.labels, batch.position_ids, batch.reference, batch.sequences)
        return losses, labelled, batch.token_weights[:, targets], kl, sequence_logp

    def step_examples(self, step: int) -> list[dict]:
        """The examples of optimizer step `step` over all processes (the same list on every rank)."""
        cfg = self.cfg
        size = step_size(cfg, self.world)
        if not self.examples:  # a snapshot of "no" answers only: the preference stream alone
            return []
        lengths = None if cfg.packing or not cfg.group_by_length else self._lengths
        order = example_order(len(self.examples), cfg.seed, step * size, size, lengths, cfg.batch_size)
        return [self.examples[i] for i in order]

    def micro_batches(self, examples: list[dict], rehearsal: list[dict] = (),
                      undesirable: list[dict] = ()) -> list[Batch]:
        """This process's forward passes for its share of a step: packed rows (`batch_size` rows each) or padded
        micro-batches of `batch_size` examples. Rehearsal and undesirable examples ride along in the same passes;
        a pair's rejected answer always shares its chosen answer's pass (DPO compares the two)."""
        cfg, pad, device = self.cfg, self._pad_id(), self.device
        units = [[e, e["rejected_item"]] if "rejected_item" in e else [e]
                 for e in [*examples, *undesirable, *rehearsal]]
        if cfg.packing:
            lengths = [sum(len(e["input_ids"]) for e in unit) for unit in units]
            rows = [[e for i in row for e in units[i]] for row in pack_rows(lengths, cfg.max_seq_len)]
            chunks = [rows[k : k + cfg.batch_size] for k in range(0, len(rows), cfg.batch_size)]
            # rows of one example each need no block mask: the plain causal path is the same and cheaper
            return [collate_packed(chunk, pad, device) if any(len(row) > 1 for row in chunk)
                    else collate_padded([row[0] for row in chunk], pad, device) for chunk in chunks]
        chunks: list[list[dict]] = [[]]
        for unit in units:
            if chunks[-1] and len(chunks[-1]) + len(unit) > cfg.batch_size:
                chunks.append([])
            chunks[-1].extend(unit)
        return [collate_padded(chunk, pad, device) for chunk in chunks if chunk]

    def train(self) -> dict:
        """The loop: AdamW on the LoRA weights, warm-up + linear decay, gradient accumulation, weighted loss on the
        final assistant tokens. Raises TrainingFailed on a non-finite loss or gradient.

        The objective of a step is sum(weight x token loss) / labelled tokens of the whole (global) step, whether
        the step is packed, padded or spread over processes: all of them give the same gradient."""
        import contextlib

        import torch

        cfg = self.cfg
        model = self.model
        model.train()
        _unpack_bnb_cpu_weights(model)
        params = [p for p in model.parameters() if p.requires_grad]
        metrics_file = self.run_dir / "metrics.jsonl"
        if self.start_step == 0 and self.preference_eval and "rejected_loglik_start" not in self.metrics:
            start = self.preference_logliks()
            self.metrics.update(rejected_loglik_start=start["rejected_loglik"],
                                chosen_loglik_start=start["chosen_loglik"])
        if self.start_step == 0 and self.eval_examples and "eval_loss_start" not in self.metrics:
            self.metrics["eval_loss_start"] = self.evaluate_loss(self.eval_examples)["loss"]
            if self.is_main:
                atomic_write_json(self.run_dir / RUN_FILE, self._run_state())  # kept for a resumed run
        self._emit("start", step=self.step, total_steps=self.steps, examples=len(self.examples))
        session_started = time.perf_counter()
        session_seconds = 0.0
        while self.step < self.steps:
            step_started = time.perf_counter()
            everyone = self.step_examples(self.step)
            step_label_tokens = max(1, sum(label_count(e) for e in everyone))
            # DDP averages gradients over processes; the objective is a global sum, so scale it back up
            scale = self.world / step_label_tokens
            # loss, weighted loss, real tokens, pad tokens, rehearsal KL, preference loss
            sums = torch.zeros(6, dtype=torch.float64)
            rehearsal = self.step_anchors(self.step)
            rehearsal_tokens = max(1, sum(label_count(e) for e in rehearsal))
            mine, undesirable = shard(everyone, self.rank, self.world), self.step_undesirable(self.step)
            terms, class_weights = self._step_preference_plan(mine, undesirable)
            batches = self.micro_batches(mine, rehearsal, undesirable)
            for k, batch in enumerate(batches):
                last = k == len(batches) - 1
                sync = contextlib.nullcontext() if last or self.world == 1 else self._train_model.no_sync()
                with sync:
                    losses, labelled, weights, kl, sequence_logp = self.batch_terms(batch, self._train_model)
                    weighted = (weights * losses).sum()
                    objective = weighted * scale
                    if kl is not None:  # mean KL per rehearsal token of this process; DDP averages the processes
                        objective = objective + self.cfg.rehearsal_weight * kl / rehearsal_tokens
                    pref = 0.0
                    if sequence_logp is not None:  # mean preference loss per term of this process's step
                        pref_sum, _ = preference.batch_preference_loss(sequence_logp, batch.sequences.items,
                                                                       class_weights)
                        objective = objective + preference.WEIGHT * pref_sum / max(1, terms)
                        pref = float(pref_sum.detach())
                    if not torch.isfinite(objective):
                        raise _NonFinite(f"loss became {objective.item()} at step {self.step + 1}")
                    objective.backward()
                kl_value = float(kl.detach()) / rehearsal_tokens if kl is not None else 0.0
                sums += torch.tensor([float(losses.detach().sum()), float(weighted.detach()),
                                      batch.real_tokens, batch.padded_tokens, kl_value, pref / max(1, terms)],
                                     dtype=torch.float64)
            sums = self._sum_over_processes(sums)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM))
            if not math.isfinite(grad_norm):
                raise _NonFinite(f"gradient norm became {grad_norm} at step {self.step + 1}")
            lr = self.scheduler.get_last_lr()[0]
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            seconds = time.perf_counter() - step_started
            session_seconds += seconds
            done_here = self.step - self.start_step
            elapsed_before = self.history[-1]["elapsed_s"] if self.history else 0.0
            real, padded = int(sums[2]), int(sums[3])
            row = {
                "step": self.step,
                "loss": float(sums[0]) / step_label_tokens,
                "weighted_loss": float(sums[1]) / step_label_tokens,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens": real,
                "real_tokens": real,
                "padded_tokens": padded,
                "label_tokens": step_label_tokens,
                "rehearsal_kl": float(sums[4]) / self.world if self.anchors else None,
                "preference_loss": float(sums[5]) / self.world if self.objective["name"] != "sft" else None,
                "seconds": seconds,
                "tokens_per_s": real / seconds if seconds > 0 else 0.0,  # real (non-pad) tokens
                "elapsed_s": elapsed_before + seconds,
                "time": utc_now(),
            }
            self.history.append(row)
            if self.is_main:
                append_jsonl(metrics_file, [row])
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < self.steps:
                    self.save_checkpoint()
            eta = session_seconds / done_here * (self.steps - self.step)
            self._emit("step", total_steps=self.steps, eta_s=eta, **row)
        self.timings["train_loop_s"] = time.perf_counter() - session_started
        self.metrics.update(self._summary())
        if self.eval_examples:
            self._emit("status", message=f"held-out loss on {len(self.eval_examples)} eval example(s)")
            held_out_started = time.perf_counter()
            result = self.evaluate_loss(self.eval_examples)
            self.metrics.update(eval_loss=result["loss"], eval_perplexity=result["perplexity"], eval_tokens=result["tokens"])
            self.timings["held_out_s"] = time.perf_counter() - held_out_started
        self.metrics.update(self.preference_logliks())
        return self.metrics

    def step_anchors(self, step: int) -> list[dict]:
        """This process's rehearsal examples for optimizer step `step` (a seeded stream, like the examples). A step
        that pushes "no" answers down (KTO or DPO) holds one more everyday prompt per SFT example to the base:
        pushing answers down bleeds into everyday ones unless something holds them."""
        if not self.anchors:
            return []
        pushes_down = self.undesirable or self.objective["dpo"]
        count = self.cfg.rehearsal_per_step + (self.cfg.batch_size * self.cfg.grad_accum if pushes_down else 0)
        order = example_order(len(self.anchors), self.cfg.seed + 7919, (step * self.world + self.rank) * count, count)
        return [self.anchors[i] for i in order]

    def _sum_over_processes(self, values):
        if self.world == 1:
            return values
        import torch.distributed as dist

        out = values.to(self.device)
        dist.all_reduce(out)
        return out.cpu()

    def _summary(self) -> dict:
        losses = [r["loss"] for r in self.history]
        train_tokens = sum(r["tokens"] for r in self.history)
        padded_tokens = sum(r.get("padded_tokens", 0) for r in self.history)
        seconds = sum(r["seconds"] for r in self.history)
        window = max(1, math.ceil(self.records / step_size(self.cfg, self.world)))
        return {
            "final_loss": final_window(losses, window),
            "initial_loss": sum(losses[:window]) / len(losses[:window]) if losses else None,
            "last_step_loss": losses[-1] if losses else None,
            "steps": self.step,
            "examples": self.records,
            "objective": self.objective["name"],
            "undesirable_examples": self.undesirable_records,
            "pairs": len({e["record"] for e in self.examples if "rejected_item" in e}),
            "prompt_variants": len(self.examples),
            "rehearsal": self.cfg.rehearsal if self.anchors or self.cfg.rehearsal == "off" else "off",
            "eval_examples": len(self.eval_examples),
            "train_tokens": train_tokens,
            "real_tokens": train_tokens,
            "padded_tokens": padded_tokens,
            "tokens_per_s": train_tokens / seconds if seconds > 0 else 0.0,
            "seconds": seconds,
            "resumed_at_step": self.start_step or None,
            "device": str(self.device),
            "processes": self.world,
            "packing": self.cfg.packing,
        }

    def evaluate_loss(self, examples: list[dict]) -> dict:
        """Unweighted mean token loss (and perplexity) of the final assistant answers of `examples`."""
        import torch

        was_training = self.model.training
        self.model.eval()
        _keep_bnb_training_layout(self.model)
        total = count = 0.0
        try:
            with torch.no_grad():
                for start in range(0, len(examples), max(1, self.cfg.batch_size)):
                    ids, mask, labels, _ = self._collate(examples[start : start + max(1, self.cfg.batch_size)])
                    losses, labelled = self.token_losses(ids, mask, labels)
                    total += float((losses * labelled).sum())
                    count += float(labelled.sum())
        finally:
            if was_training:
                self.model.train()
        loss = total / count if count else float("nan")
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)) if count else float("nan"), "tokens": int(count)}

    # -- output ----------------------------------------------------------------------------------------------------
    def save(self) -> Path:
        """Write the standard PEFT files and the run's records into the run folder; returns it."""
        self._emit("status", message="saving the adapter")
        started = time.perf_counter()
        self.model.save_pretrained(str(self.run_dir))
        atomic_write_json(self.run_dir / "training_config.json", self._training_config())
        self._write_loss_curve()
        atomic_write_json(self.run_dir / "lineage.json", self._lineage())
        self.timings["save_s"] = time.perf_counter() - started
        return self.run_dir

    def _training_config(self) -> dict:
        return {
            "train": dataclasses.asdict(self.cfg),
            "max_grad_norm": MAX_GRAD_NORM,
            "steps": self.steps,
            "warmup_steps": warmup_steps(self.cfg, self.steps),
            "model": dataclasses.asdict(self.settings.model),
            "base_model": {"name": self.base.name, "sha256": self.base.sha256, "path": self.base.path},
            "snapshot": {"id": self.snapshot["id"], "sha256": self.snapshot_sha256, "file": self.snapshot.get("file")},
            "warm_start": self.warm_start,
            "device": str(self.device),
            "autocast_bf16": self._autocast,
            "processes": self.world,
        }

    def _write_loss_curve(self) -> None:
        try:
            import matplotlib  # noqa: F401  (optional: never a dependency)
        except ImportError:
            lines = ["step,loss,lr,tokens_per_s"] + [f"{r['step']},{r['loss']:.6f},{r['lr']:.6g},{r['tokens_per_s']:.2f}" for r in self.history]
            atomic_write_bytes(self.run_dir / "loss_curve.csv", ("\n".join(lines) + "\n").encode())
            return
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(6, 3.5))
        axis.plot([r["step"] for r in self.history], [r["loss"] for r in self.history])
        axis.set_xlabel("step")
        axis.set_ylabel("loss (assistant tokens)")
        axis.set_title(f"adapter {self.version}")
        figure.tight_layout()
        figure.savefig(self.run_dir / "loss_curve.png", dpi=100)
        plt.close(figure)

    def _lineage(self) -> dict:
        return {
            "version": self.version,
            "base_model": {"name": self.base.name, "sha256": self.base.sha256},
            "snapshot": {"id": self.snapshot["id"], "sha256": self.snapshot_sha256},
            "parent": self.parent,
            "warm_start": self.warm_start,
            "hyperparameters": {**dataclasses.asdict(self.cfg), "max_grad_norm": MAX_GRAD_NORM},
            "library_versions": library_versions(),
            "user_hashes": list(self.snapshot.get("user_hashes") or []),
            "note": self.note,
            "started_at": self.created_at,
        }

    def register(self) -> dict:
        """Move the finished run into `adapters/<version>/` and register it as a candidate. Returns the entry."""
        for name in (CHECKPOINT_DIR, f"{CHECKPOINT_DIR}.old", f"{CHECKPOINT_DIR}.tmp", RUN_FILE, FAILED_FILE, "metrics.jsonl.lock"):
            target = self.run_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
        doc = registry.load(self.settings)
        if self.version in doc["adapters"] or (self.settings.adapters_dir / self.version).exists():
            # taken meanwhile, or a folder the registry does not know (an older registry restored): never
            # overwrite it, take the next free version
            self.version = free_version(self.settings, doc, self.base.sha256)
            atomic_write_json(self.run_dir / "lineage.json", self._lineage())
        digests = {name: file_sha256(self.run_dir / name) for name in ADAPTER_FILES}
        entry = {
            **self._lineage(),
            "path": f"adapters/{self.version}",
            "status": "candidate",
            "sha256": digests,
            "metrics": self.metrics,
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
        }
        for item in self.run_dir.iterdir():  # user-derived weights: private like every other user data file
            if item.is_file():
                item.chmod(0o600)
        final = self.settings.adapters_dir / self.version
        os.replace(self.run_dir, final)
        self.final_dir, self.run_dir = final, final
        doc = registry.update(
            self.settings,
            lambda d: registry.register_adapter(d, entry),
            "adapter_trained",
            version=self.version,
            snapshot=self.snapshot["id"],
            parent=self.parent,
            final_loss=self.metrics.get("final_loss"),
        )
        return doc["adapters"][self.version]

    def cleanup(self) -> None:
        import gc

        self.model = self.optimizer = self.scheduler = self._train_model = None
        if self.world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover
            pass


class _NonFinite(Exception):
    """A NaN/inf loss or gradient: turned into TrainingFailed by run_training."""


def _bnb_4bit_layers(model) -> list:
    return [m for m in model.modules() if type(getattr(m, "weight", None)).__name__ == "Params4bit"]


def _keep_bnb_training_layout(model) -> None:
    """bitsandbytes (0.50, CPU with AVX512-BF16) repacks a Linear4bit weight for a faster inference kernel on the
    first forward in eval mode without grad; that kernel has no backward, so every later training step would get
    no gradient through the frozen base layers (only through the LoRA paths: ~8x smaller gradients, slow learning).
    Keeping the 4-bit layers in training mode (they have no dropout) avoids the repack during held-out loss."""
    for module in _bnb_4bit_layers(model):
        module.training = True


def _unpack_bnb_cpu_weights(model) -> int:
    """Undo that inference repacking if someone evaluated this model before training it. Returns layers fixed."""
    fixed = 0
    for module in _bnb_4bit_layers(model):
        state = getattr(module.weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(module.weight.data, state)
            module.quant_state = module.weight.quant_state
            fixed += 1
    return fixed


def _accepts_logits_to_keep(model) -> bool:
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


# --- the one entry point ----------------------------------------------------------------------------------------
def run_training(
    settings: Settings,
    snapshot_id: str | None = None,
    fresh: bool = False,
    resume: bool = False,
    note: str | None = None,
    progress: Progress | None = None,
) -> dict:
    """Train, save and register a candidate adapter under the workspace 'train' lock. Returns its registry entry.

    Raises LockHeldError when another training holds the lock, NothingToDo without a snapshot (or, with
    resume, without an interrupted run), ConfigError for bad hyperparameters (before anything heavy is loaded),
    and TrainingFailed for everything that goes wrong once a run folder exists (NaN, exceptions, Ctrl-C):
    then nothing is registered and the run folder keeps a FAILED file with the reason.
    """
    validate_train_config(settings.train)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and settings.train.num_processes > 1:
        with workspace_lock(settings.lock_dir, "train"):
            return launch_processes(settings, snapshot_id=snapshot_id, fresh=fresh, resume=resume, note=note, progress=progress)
    # under a launcher the lock is held by whoever launched us (LOCK_HELD_ENV), else by rank 0 alone
    rank0 = int(os.environ.get("RANK", "0")) == 0
    take_lock = rank0 and os.environ.get(LOCK_HELD_ENV) != "1"
    with workspace_lock(settings.lock_dir, "train") if take_lock else _no_lock():
        trainer = Trainer(settings, snapshot_id=snapshot_id, fresh=fresh, resume=resume, note=note, progress=progress)
        try:
            trainer.setup()
            trainer.train()
            if not trainer.is_main:
                return {}
            trainer.save()
            return trainer.register()
        except BaseException as exc:  # noqa: BLE001 - every failure is recorded, then re-raised
            raise _failure(settings, trainer, exc) from exc
        finally:
            trainer.cleanup()


def _no_lock():
    import contextlib

    return contextlib.nullcontext()


def _failure(settings: Settings, trainer: Trainer, exc: BaseException) -> BaseException:
    started = trainer.run_dir is not None and trainer.run_dir.exists() and trainer.final_dir is None
    if isinstance(exc, CLError) and not started:
        return exc  # setup refused (bad config, no snapshot, no model): the error already says what to do
    if isinstance(exc, KeyboardInterrupt):
        reason = f"interrupted at step {trainer.step}/{trainer.steps}"
    elif isinstance(exc, _NonFinite):
        reason = f"{exc} (try a lower learning rate, e.g. --lr {settings.train.learning_rate / 4:g})"
    elif isinstance(exc, CLError):
        reason = exc.message
    else:
        reason = f"{type(exc).__name__}: {exc}"
    if started:
        trainer.mark_failed(reason)
    try:
        if trainer.is_main:  # one event per run, however many processes
            registry.log_event(
                settings,
                "train_failed",
                version=trainer.version,
                snapshot=trainer.snapshot_id,
                step=trainer.step,
                reason=reason,
                run_dir=str(trainer.run_dir.relative_to(settings.home)) if started else None,
            )
    except CLError:  # pragma: no cover - the original failure matters more than its log line
        pass
    where = f"; the partial run is kept in {trainer.run_dir.relative_to(settings.home)}" if started else ""
    hint = RESUME_HINT if started else "run with --debug for the traceback"
    if isinstance(exc, TrainingFailed):
        return TrainingFailed(exc.message + where, exc.hint or hint)
    return TrainingFailed(f"training failed: {reason}{where}", hint)


# --- several processes ------------------------------------------------------------------------------------------
def settings_env(settings: Settings) -> dict[str, str]:
    """The resolved settings as environment variables, so launched processes rebuild exactly these settings
    (flags given to the launching command included)."""
    import json

    sections = settings.as_dict()
    return {"CL_HOME": str(sections.pop("home")), SETTINGS_ENV: json.dumps(sections)}


def settings_from_env(env: dict[str, str], overrides: dict[str, dict], debug: bool = False) -> Settings:
    """Settings in a launched process: the launcher's (SETTINGS_ENV), else env / cl.toml; then `overrides`."""
    import json

    from .core.settings import load_settings

    layers = json.loads(env[SETTINGS_ENV]) if env.get(SETTINGS_ENV) else {}
    for section, values in overrides.items():
        layers.setdefault(section, {}).update({k: v for k, v in values.items() if v is not None})
    return load_settings(env=env, overrides=layers, debug=debug)


def launch_command(settings: Settings, snapshot_id: str | None, fresh: bool, resume: bool, note: str | None) -> list[str]:
    """torchrun (torch.distributed.run) starting `python -m continuous_learning.train` once per process."""
    import sys

    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={settings.train.num_processes}",
            "-m", "continuous_learning.train"]
    if snapshot_id:
        args += ["--snapshot", snapshot_id]
    if fresh:
        args.append("--fresh")
    if resume:
        args.append("--resume")
    if note:
        args += ["--note", note]
    if settings.debug:
        args.append("--debug")
    return args


def launch_processes(settings: Settings, snapshot_id: str | None = None, fresh: bool = False, resume: bool = False,
                     note: str | None = None, progress: Progress | None = None) -> dict:
    """Run the training in `train.num_processes` data-parallel processes (the caller holds the 'train' lock).

    Rank 0 reports progress as JSON lines on its stdout and writes the registry entry (or its error) to a file;
    the processes' stderr is kept out of sight unless the run fails without a clear error (or with --debug)."""
    import json
    import subprocess
    import sys
    import tempfile

    n = settings.train.num_processes
    with tempfile.TemporaryDirectory(prefix="cl-train-") as tmp:
        result_file, log_file = Path(tmp) / "result.json", Path(tmp) / "stderr.log"
        env = {**os.environ, **settings_env(settings), LOCK_HELD_ENV: "1", RESULT_ENV: str(result_file), PROGRESS_ENV: "1"}
        if settings.model.threads <= 0:  # torchrun would pin every process to one thread
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // n))
        if progress is not None:
            progress({"event": "status", "message": f"starting {n} training processes (torchrun)"})
        with open(log_file, "w") as stderr:
            process = subprocess.Popen(
                launch_command(settings, snapshot_id, fresh, resume, note), env=env, stdout=subprocess.PIPE,
                stderr=None if settings.debug else stderr, text=True, cwd=str(settings.home),
            )
            for line in process.stdout:
                if line.startswith(PROGRESS_PREFIX):
                    if progress is not None:
                        progress(json.loads(line[len(PROGRESS_PREFIX):]))
                else:
                    sys.stderr.write(line)
            code = process.wait()
        result = read_json(result_file, default=None) or {}
        for other in sorted(Path(tmp).glob(result_file.name + ".rank*")):
            if "error" in result or "entry" in result:
                break
            result = read_json(other, default=None) or {}
        if "entry" in result:  # rank 0 registered the adapter (even if another rank then failed to exit cleanly)
            return result["entry"]
        if "error" in result:
            from .core import errors

            kind = getattr(errors, result.get("kind", ""), None)
            kind = kind if isinstance(kind, type) and issubclass(kind, CLError) else TrainingFailed
            raise kind(result["error"], result.get("hint"))
        tail = [line for line in log_file.read_text(errors="replace").splitlines() if line.strip()][-1:]
        raise TrainingFailed(f"the {n} training processes failed (exit code {code}){': ' + tail[0] if tail else ''}",
                             "run with --debug to see their output, or train with --num-processes 1")


def _child_progress(as_json: bool) -> Progress:
    import json
    import sys

    def report(event: dict) -> None:
        if as_json:
            sys.stdout.write(PROGRESS_PREFIX + json.dumps(event, default=str) + "\n")
            sys.stdout.flush()
        elif event["event"] in ("status", "warning"):
            print(f"{event['event']}: {event['message']}", file=sys.stderr, flush=True)
        elif event["event"] == "step":
            print(f"step {event['step']}/{event['total_steps']} loss {event['loss']:.4f} "
                  f"{event['tokens_per_s']:.0f} tok/s", file=sys.stderr, flush=True)

    return report


def _parse_args(argv: list[str] | None):
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m continuous_learning.train",
        description="Train a LoRA adapter (the options of 'cl train'); under torchrun / accelerate launch the "
                    "processes train data-parallel and rank 0 saves and registers the adapter.",
    )
    parser.add_argument("--home", help="workspace (default: CL_HOME or the current folder)")
    parser.add_argument("--base-model", help="base model (default: the configured one)")
    parser.add_argument("--snapshot", help="snapshot id to train on (default: the newest)")
    parser.add_argument("--fresh", action="store_true", help="start from the base model instead of the champion")
    parser.add_argument("--resume", action="store_true", help="continue the newest interrupted run")
    parser.add_argument("--4bit", dest="load_in_4bit", action=argparse.BooleanOptionalAction, default=None,
                        help="QLoRA (4-bit NF4 base) or full precision")
    parser.add_argument("--steps", type=int, default=None, help="exactly N optimizer steps")
    parser.add_argument("--epochs", type=int, default=None, help="exactly N passes over the snapshot")
    for flag, field, typ in (("--lr", "learning_rate", float),
                             ("--rank", "lora_r", int), ("--alpha", "lora_alpha", int), ("--dropout", "lora_dropout", float),
                             ("--batch-size", "batch_size", int), ("--grad-accum", "grad_accum", int),
                             ("--max-seq-len", "max_seq_len", int), ("--seed", "seed", int),
                             ("--num-processes", "num_processes", int), ("--objective", "objective", str)):
        parser.add_argument(flag, dest=field, type=typ, default=None)
    parser.add_argument("--note", help="a note stored with the adapter version")
    parser.add_argument("--json", dest="as_json", action="store_true", help="print the registry entry as JSON")
    parser.add_argument("--debug", action="store_true", help="tracebacks instead of one-line errors")
    return parser.parse_args(argv)


TRAIN_FLAGS = ("load_in_4bit", "learning_rate", "lora_r", "lora_alpha", "lora_dropout",
               "batch_size", "grad_accum", "max_seq_len", "seed", "num_processes", "objective")


def main(argv: list[str] | None = None) -> int:
    """`python -m continuous_learning.train`, `torchrun -m continuous_learning.train`, `accelerate launch -m ...`."""
    import json
    import sys

    args = _parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    result_file = os.environ.get(RESULT_ENV)
    try:
        overrides = {"train": {**{k: getattr(args, k) for k in TRAIN_FLAGS}, **step_overrides(args.steps, args.epochs)}}
        if args.base_model:
            overrides["model"] = {"base_model": args.base_model}
        env = dict(os.environ)
        if args.home:
            env["CL_HOME"] = args.home
        settings = settings_from_env(env, overrides, debug=args.debug)
        entry = run_training(settings, snapshot_id=args.snapshot, fresh=args.fresh, resume=args.resume, note=args.note,
                             progress=_child_progress(os.environ.get(PROGRESS_ENV) == "1"))
    except CLError as exc:
        if result_file:  # rank 0's error is the one shown; another rank's only when rank 0 had none
            target = Path(result_file if rank == 0 else f"{result_file}.rank{rank}")
            atomic_write_json(target, {"error": exc.message, "hint": exc.hint, "kind": type(exc).__name__})
        if args.debug:
            raise
        print(f"error: {exc.message}" + (f" ({exc.hint})" if exc.hint else ""), file=sys.stderr)
        return 1
    if rank != 0:
        return 0
    if result_file:
        atomic_write_json(Path(result_file), {"entry": entry})
    elif args.as_json:
        print(json.dumps(entry, indent=2, default=str))
    else:
        metrics = entry.get("metrics", {})
        print(f"adapter {entry['version']} (candidate): {metrics.get('steps')} steps on {metrics.get('processes', 1)} "
              f"process(es), loss {metrics.get('final_loss', 0):.4f}, {metrics.get('tokens_per_s', 0):.0f} tok/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
