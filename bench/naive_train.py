"""The baselines of the training benchmark, each a whole command run in its own process, as a practitioner would
write them:

- `naive`: load the base (4-bit NF4 for QLoRA), wrap it with PEFT LoRA, then a plain AdamW loop over shuffled
  batches padded to their longest example, with the model's own loss (`labels=`);
- `trl`: TRL's `SFTTrainer` on the same tokens, LoRA config and hyperparameters. Without packing or padding-free
  batches: TRL's padding-free path isolates examples only through FlashAttention (its docs say so); on the CPU with
  sdpa attention, restarting position ids alone let packed examples attend to each other (see the GUIDE), so the
  correct TRL setting here is padded batches.

Both tokenize with the project's `tokenize_examples`, so every side trains on identical token ids and labels
(tokenizing is milliseconds; the comparison is about loading and training). Both end with the held-out loss (mean
token loss over the held-out answers), computed the same way.

`python -m bench.naive_train naive|trl --base DIR --train FILE --eval FILE --epochs N ...` prints one JSON line.
"""
from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time

import orjson

STARTED = time.perf_counter()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.naive_train")
    parser.add_argument("kind", choices=("naive", "trl"))
    parser.add_argument("--base", required=True, help="base model folder")
    parser.add_argument("--train", required=True, help="snapshot JSONL (messages format)")
    parser.add_argument("--eval", required=True, help="held-out JSONL (messages format)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=int, default=32)
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--warmup-ratio", type=float, default=0.05)
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--4bit", dest="load_in_4bit", action=argparse.BooleanOptionalAction, default=True)
    return parser.parse_args(argv)


def read_examples(path: str, tokenizer, max_seq_len: int) -> list[dict]:
    from continuous_learning.train import tokenize_examples

    records = [orjson.loads(line) for line in open(path, "rb").read().splitlines() if line.strip()]
    examples, _ = tokenize_examples(tokenizer, records, max_seq_len)
    return examples


def load_lora_model(args: argparse.Namespace, device: str = "cpu"):
    """The base as a practitioner loads it for (Q)LoRA, with a LoRA on every linear layer."""
    import torch
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict = {"dtype": torch.float32}
    if args.load_in_4bit:
        kwargs = {"dtype": torch.bfloat16, "device_map": device, "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)}
    model = AutoModelForCausalLM.from_pretrained(args.base, attn_implementation="sdpa", local_files_only=True, **kwargs)
    if not args.load_in_4bit:
        model.to(device)
    model.config.use_cache = False
    if args.load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model, lora_config(args)


def lora_config(args: argparse.Namespace):
    from peft import LoraConfig

    return LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=args.dropout, target_modules="all-linear",
                      bias="none", task_type="CAUSAL_LM")


def padded_batch(batch: list[dict], pad_id: int, device: str = "cpu"):
    import torch

    length = max(len(e["input_ids"]) for e in batch)
    ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), length), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), length), dtype=torch.long)
    for row, e in enumerate(batch):
        ids[row, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
        labels[row, : len(e["labels"])] = torch.tensor(e["labels"])
        mask[row, : len(e["input_ids"])] = 1
    return ids.to(device), mask.to(device), labels.to(device)


def heldout_loss(model, examples: list[dict], autocast: bool, device: str = "cpu") -> float:
    """Mean token loss over the held-out answers, one example at a time (no padding)."""
    import torch
    import torch.nn.functional as F

    model.eval()
    total = count = 0.0
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
        for example in examples:
            ids = torch.tensor([example["input_ids"]], device=device)
            labels = torch.tensor([example["labels"]], device=device)
            logits = model(input_ids=ids, use_cache=False).logits.float()
            total += float(F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="sum"))
            count += int((labels[0, 1:] != -100).sum())
    return total / count


def warmup_steps(args: argparse.Namespace, steps: int) -> int:
    return min(steps - 1, math.ceil(args.warmup_ratio * steps)) if steps > 1 else 0


def naive_loop(args: argparse.Namespace, device: str = "cpu") -> dict:
    import torch
    from peft import get_peft_model
    from transformers import AutoTokenizer

    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.base, local_files_only=True)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    examples = read_examples(args.train, tokenizer, args.max_seq_len)
    held_out = read_examples(args.eval, tokenizer, args.max_seq_len)
    base, config = load_lora_model(args, device)
    model = get_peft_model(base, config)
    loaded_s = time.perf_counter() - STARTED
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    per_epoch = math.ceil(len(examples) / args.batch_size)
    steps = per_epoch * args.epochs
    warmup = warmup_steps(args, steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warmup if s < warmup else max(0.0, (steps - s) / max(1, steps - warmup)))
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model.train()
    real = padded = 0
    train_started = time.perf_counter()
    for epoch in range(args.epochs):
        order = list(range(len(examples)))
        random.Random(args.seed + epoch).shuffle(order)
        for start in range(0, len(order), args.batch_size):
            batch = [examples[i] for i in order[start : start + args.batch_size]]
            ids, mask, labels = padded_batch(batch, pad_id, device)
            with torch.autocast(device, dtype=torch.bfloat16, enabled=args.load_in_4bit):
                loss = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            real += int(mask.sum())
            padded += ids.numel() - int(mask.sum())
    train_s = time.perf_counter() - train_started
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    return {"load_s": loaded_s, "train_s": train_s, "steps": steps, "real_tokens": real, "padded_tokens": padded,
            "tokens_per_s": real / train_s, "heldout_loss": heldout_loss(model, held_out, args.load_in_4bit, device),
            "peak_gpu_mb": peak}


def trl_sft(args: argparse.Namespace, device: str = "cpu") -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.base, local_files_only=True)
    examples = read_examples(args.train, tokenizer, args.max_seq_len)
    held_out = read_examples(args.eval, tokenizer, args.max_seq_len)
    dataset = Dataset.from_list([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples])
    base, config = load_lora_model(args, device)
    loaded_s = time.perf_counter() - STARTED
    steps = math.ceil(len(examples) / args.batch_size) * args.epochs
    sft = SFTConfig(
        output_dir=os.environ.get("BENCH_TRL_OUT", "/tmp/bench_trl"), per_device_train_batch_size=args.batch_size,
        num_train_epochs=args.epochs, learning_rate=args.lr, lr_scheduler_type="linear",
        warmup_steps=warmup_steps(args, steps),
        weight_decay=0.0, max_grad_norm=1.0, bf16=args.load_in_4bit, use_cpu=device == "cpu", seed=args.seed,
        max_length=args.max_seq_len, packing=False, padding_free=False, report_to=[], save_strategy="no",
        logging_steps=1000, disable_tqdm=True, dataloader_num_workers=0, gradient_checkpointing=False,
        dataset_kwargs={"skip_prepare_dataset": True})
    trainer = SFTTrainer(model=base, args=sft, train_dataset=dataset, processing_class=tokenizer, peft_config=config)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    train_started = time.perf_counter()
    out = trainer.train()
    train_s = time.perf_counter() - train_started
    real = sum(len(e["input_ids"]) for e in examples) * args.epochs
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    return {"load_s": loaded_s, "train_s": train_s, "steps": out.global_step, "real_tokens": real,
            "tokens_per_s": real / train_s,
            "heldout_loss": heldout_loss(trainer.model, held_out, args.load_in_4bit, device),
            "peak_gpu_mb": peak}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    threads = int(os.environ.get("CL_MODEL_THREADS") or 0)
    if threads > 0:
        torch.set_num_threads(threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    figures = naive_loop(args, device) if args.kind == "naive" else trl_sft(args, device)
    figures["seconds"] = time.perf_counter() - STARTED
    figures["device"] = device
    sys.stdout.write("@@RESULT@@" + orjson.dumps(figures).decode() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
