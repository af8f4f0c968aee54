"""Training, as a user runs it: the whole `cl train` command (process start, model load, tokenizing, the loop,
held-out loss, saving and registering) against the whole naive padded PEFT loop at equal work (the same examples,
the same epochs, the same model, LoRA and hyperparameters, its own model load), and the loop's tokens/s against
TRL's `SFTTrainer` on the same tokens. Each repeat runs every side once, interleaved, so drifting machine load hits
them alike; ratios are per repeat, then the median and the spread.

The equal-work runs of `cl train` turn rehearsal off (`CL_TRAIN_REHEARSAL=off`): its KL term toward the frozen base
is work the baselines do not do. A default `cl train` (rehearsal on) runs too, and so does the preference term (KTO
on answers rated "no") against SFT alone on the same snapshot, so the cost of each extra per-step term is measured
rather than guessed (`extra_term_variants`)."""
from __future__ import annotations

import dataclasses
import random
import shutil
import sys

import orjson

from .common import CACHE_DIR, child_env, commit_info, median, paired_ratios, result, run_measured, spread
from .workspaces import apply_env, new_home, workspace_env

GOAL_COMMAND = 2.0
GOAL_TRL = 1.5
GOAL_LOSS_GAP = 0.02
SYSTEM = "You are a helpful assistant for the plant's operators."


@dataclasses.dataclass(frozen=True)
class Workload:
    train_examples: int
    eval_examples: int
    long_share: float  # share of examples with a long answer
    long_words: tuple[int, int]
    batch_size: int
    epochs: int
    max_seq_len: int
    tiny_model: bool


# Sized so that three repeats of three whole commands fit the default run's budget on 2 busy cores.
FULL = Workload(train_examples=16, eval_examples=8, long_share=0.15, long_words=(120, 200), batch_size=8, epochs=2,
                max_seq_len=512, tiny_model=False)
QUICK = Workload(train_examples=8, eval_examples=4, long_share=0.25, long_words=(40, 60), batch_size=4, epochs=1,
                 max_seq_len=256, tiny_model=True)
MAX_REPEATS = 3  # one repeat trains the real model three times
# TRL's SFTTrainer ran at about a third of the naive loop's tokens/s here (its chunked output layer also computes
# entropy and top-1 metrics at every position): it trains one epoch of the same examples, and its tokens/s (a rate)
# is compared; its whole-command time is not comparable and is not reported as a ratio.
TRL_EPOCHS = 1
TRL_REPEATS = MAX_REPEATS  # a median of three, like the other sides (about 100 s each here)

WORDS = ("valve pump line lot torque pressure gauge shift batch seal filter motor sensor belt panel cooling "
         "operator inspect release check start stop record replace clean calibrate wait confirm open close "
         "north south hall orion kestrel vanta amsel quickly carefully first then finally before after").split()


PREFERENCE_SNAPSHOT = "bench_pref"
REJECTED_PER_EXAMPLE = 2  # one answer rated "no" for every second helpful one


@dataclasses.dataclass(frozen=True)
class Variant:
    """A `cl train` run whose seconds per step are reported: its settings, snapshot, and the run it is compared
    with (the same data without the term)."""

    env: dict[str, str]
    snapshot: str = "bench"
    compared_with: str = "none"


def extra_term_variants() -> dict[str, Variant]:
    """'none' is the equal-work run. Each other entry turns one per-step loss term on, and its extra seconds per
    step over `compared_with` appear in RESULTS.md."""
    return {
        "none": Variant({"CL_TRAIN_REHEARSAL": "off"}, compared_with=""),
        "kl_rehearsal": Variant({}),  # the defaults: KL toward the frozen base on 2 everyday prompts per step
        # the same snapshot with answers rated "no": SFT alone, then the default objective (SFT + KTO on them)
        "sft_on_preference_snapshot": Variant({"CL_TRAIN_REHEARSAL": "off", "CL_TRAIN_OBJECTIVE": "sft"},
                                              PREFERENCE_SNAPSHOT, compared_with=""),
        "kto_preference": Variant({"CL_TRAIN_REHEARSAL": "off", "CL_TRAIN_OBJECTIVE": "auto"}, PREFERENCE_SNAPSHOT,
                                  compared_with="sft_on_preference_snapshot"),
    }


# --- the snapshot -----------------------------------------------------------------------------------------------
def snapshot_records(count: int, long_share: float, long_words: tuple[int, int], seed: int) -> list[dict]:
    """Chat examples, deterministic for `seed`: short questions, mostly one-sentence answers, a few long procedures."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        part = f"{rng.choice('ABCDEFGH')}{rng.choice('QRSTUVWX')}-{rng.randint(10, 999)}"
        question = f"What should I know about part {part} on line {rng.choice(WORDS).title()}-{rng.randint(1, 9)}?"
        if rng.random() < long_share:
            words = [rng.choice(WORDS) for _ in range(rng.randint(*long_words))]
            sentences = [" ".join(words[k : k + 12]).capitalize() + "." for k in range(0, len(words), 12)]
            answer = f"For part {part}: " + " ".join(sentences)
        else:
            answer = f"Part {part} is checked by {rng.choice(WORDS)} shift at gauge {rng.randint(1, 40)}."
        out.append({"id": f"bench-{seed}-{i}", "weight": 1.0, "messages": [
            {"role": "system", "content": SYSTEM}, {"role": "user", "content": question},
            {"role": "assistant", "content": answer}]})
    return out


def rejected_records(train: list[dict]) -> list[dict]:
    """Answers rated "no" (KTO's undesirable examples) to every second training question, as curation writes them."""
    from continuous_learning.train import preference

    out = []
    for record in train[::REJECTED_PER_EXAMPLE]:
        messages = record["messages"][:-1] + [{"role": "assistant", "content": "I am not sure; ask someone else."}]
        out.append({"id": record["id"] + "-no", "weight": 1.0, "messages": messages,
                    **preference.trl_fields(messages, desirable=False)})
    return out


def write_snapshot(settings, train: list[dict], held_out: list[dict], snapshot_id: str = "bench") -> tuple:
    """Register a snapshot (train file + held-out eval file) in the workspace; the two file paths."""
    from continuous_learning import registry
    from continuous_learning.chat.models import file_sha256

    folder = settings.curated_dir
    folder.mkdir(parents=True, exist_ok=True)
    train_path, eval_path = folder / f"curated_{snapshot_id}.jsonl", folder / f"curated_{snapshot_id}_eval.jsonl"
    train_path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in train))
    eval_path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in held_out))
    snapshot = {"id": snapshot_id, "file": str(train_path.relative_to(settings.home)),
                "sha256": file_sha256(train_path), "eval_file": str(eval_path.relative_to(settings.home)),
                "user_hashes": [], "count": len(train)}
    registry.update(settings, lambda d: registry.add_snapshot(d, snapshot), "snapshot_created", snapshot=snapshot_id)
    return train_path, eval_path


def tiny_model_dir():
    """A 2-layer random Llama speaking through the bundled SmolLM2 tokenizer (for --quick), built once."""
    folder = CACHE_DIR / "tiny_llama"
    if (folder / "config.json").exists():
        return folder
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from continuous_learning.chat.models import bundled_gguf

    gguf = bundled_gguf()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=len(tokenizer), max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    tmp = folder.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    LlamaForCausalLM(config).save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    tmp.rename(folder)
    return folder


# --- the sides, each a whole command in its own process -----------------------------------------------------------
def cl_train(env: dict, work: Workload, variant: Variant) -> dict:
    """`cl train --snapshot S --fresh --epochs E --batch-size B --json`, timed whole."""
    argv = [sys.executable, "-m", "continuous_learning.cli", "train", "--snapshot", variant.snapshot, "--fresh",
            "--epochs", str(work.epochs), "--batch-size", str(work.batch_size), "--max-seq-len",
            str(work.max_seq_len), "--json"]
    run = run_measured(argv, env=child_env(**env, **variant.env))
    if run["returncode"] != 0:
        raise RuntimeError(f"cl train failed: {run['stderr'][-800:]}")
    entry = orjson.loads(run["stdout"][run["stdout"].index("{"):])
    metrics = entry["metrics"]
    return {"seconds": run["seconds"], "cpu_s": run["cpu_s"], "peak_rss_mb": run["peak_rss_mb"],
            "train_s": metrics["seconds"], "steps": metrics["steps"], "real_tokens": metrics["real_tokens"],
            "padded_tokens": metrics["padded_tokens"], "tokens_per_s": metrics["tokens_per_s"],
            "heldout_loss": metrics.get("eval_loss"), "timings": entry.get("timings", {})}


def baseline(kind: str, env: dict, work: Workload, base_dir, train_path, eval_path, cfg, epochs: int = 0) -> dict:
    """A baseline command (bench/naive_train.py), timed whole; `epochs` other than the workload's only for TRL."""
    argv = [sys.executable, "-m", "bench.naive_train", kind, "--base", str(base_dir), "--train", str(train_path),
            "--eval", str(eval_path), "--epochs", str(epochs or work.epochs), "--batch-size", str(work.batch_size),
            "--lr", str(cfg.learning_rate), "--rank", str(cfg.lora_r), "--alpha", str(cfg.lora_alpha),
            "--dropout", str(cfg.lora_dropout), "--warmup-ratio", str(cfg.warmup_ratio),
            "--max-seq-len", str(work.max_seq_len), "--seed", str(cfg.seed),
            "--4bit" if cfg.load_in_4bit else "--no-4bit"]
    run = run_measured(argv, env=child_env(**env))
    marker = run["stdout"].rfind("@@RESULT@@")
    if run["returncode"] != 0 or marker < 0:
        raise RuntimeError(f"{kind} baseline failed: {run['stderr'][-800:]}")
    figures = orjson.loads(run["stdout"][marker + len("@@RESULT@@"):])
    return {**figures, "seconds": run["seconds"], "cpu_s": run["cpu_s"], "peak_rss_mb": run["peak_rss_mb"]}


# --- the benchmark ----------------------------------------------------------------------------------------------
def run(repeats: int, quick: bool) -> dict:
    work = QUICK if quick else FULL
    home = new_home("train")
    env = workspace_env(home)
    if work.tiny_model:
        env["CL_BASE_MODEL"] = str(tiny_model_dir())
    apply_env(env)
    try:
        return _run(work, home, env, max(1, min(repeats, MAX_REPEATS)))
    finally:
        shutil.rmtree(home, ignore_errors=True)


def _warm_caches(env: dict, settings) -> None:
    """One untimed one-step default run when the model cache holds no rehearsal material yet: it builds it (the
    base's answers and its reference distributions) once per machine, the state every later `cl train` starts from."""
    if not list(settings.model_cache.glob("rehearsal-reference-*.pt")):
        argv = [sys.executable, "-m", "continuous_learning.cli", "train", "--fresh", "--steps", "1", "--json"]
        run_measured(argv, env=child_env(**env))


def _run(work: Workload, home, env: dict, repeats: int) -> dict:
    from continuous_learning.chat.models import resolve_base
    from continuous_learning.core.settings import load_settings

    settings = load_settings()
    cfg = settings.train
    train = snapshot_records(work.train_examples, work.long_share, work.long_words, seed=1)
    held = snapshot_records(work.eval_examples, work.long_share, work.long_words, seed=2)
    write_snapshot(settings, train + rejected_records(train), held, PREFERENCE_SNAPSHOT)
    train_path, eval_path = write_snapshot(settings, train, held)
    base_dir = resolve_base(settings).path
    _warm_caches(env, settings)
    env = {**env, "BENCH_TRL_OUT": str(home / "trl_out")}

    variants = extra_term_variants()
    runs: dict[str, list[dict]] = {"naive": [], "trl": [], **{name: [] for name in variants}}
    for repeat in range(repeats):
        runs["naive"].append(baseline("naive", env, work, base_dir, train_path, eval_path, cfg))
        runs["none"].append(cl_train(env, work, variants["none"]))
        if repeat < TRL_REPEATS:
            runs["trl"].append(baseline("trl", env, work, base_dir, train_path, eval_path, cfg, epochs=TRL_EPOCHS))
    for name, extra in variants.items():  # one run each: the per-step cost, not a ratio
        if name != "none":
            runs[name].append(cl_train(env, work, extra))
    return _report(work, runs, cfg)


def _report(work: Workload, runs: dict[str, list[dict]], cfg) -> dict:
    ours, naive, trl = runs["none"], runs["naive"], runs["trl"]
    command = paired_ratios([r["seconds"] for r in naive], [r["seconds"] for r in ours])
    loop = paired_ratios([r["train_s"] for r in naive], [r["train_s"] for r in ours])
    vs_trl = paired_ratios([o["tokens_per_s"] for o in ours[: len(trl)]], [t["tokens_per_s"] for t in trl])
    ours_loss, naive_loss = median([r["heldout_loss"] for r in ours]), median([r["heldout_loss"] for r in naive])
    trl_loss = median([r["heldout_loss"] for r in trl])
    gap = abs(ours_loss - naive_loss) / naive_loss
    per_step = {name: median([r["train_s"] / r["steps"] for r in rs]) for name, rs in runs.items() if name in
                extra_term_variants()}
    variants = extra_term_variants()
    term_cost = {name: round(s - per_step[variants[name].compared_with], 3) for name, s in per_step.items()
                 if variants[name].compared_with}
    pad_share = naive[0]["padded_tokens"] / (naive[0]["padded_tokens"] + naive[0]["real_tokens"])
    timings = {k: round(median([r["timings"].get(k, 0.0) for r in ours]), 2) for k in ours[0]["timings"]}
    default_run = runs.get("kl_rehearsal") or ours
    raw = {
        "model": "tiny random Llama (quick)" if work.tiny_model else "bundled SmolLM2-135M-Instruct, QLoRA NF4",
        "workload": dataclasses.asdict(work), "lora_r": cfg.lora_r, "lr": cfg.learning_rate,
        "repeats": len(ours), "repeats_note": f"at most {MAX_REPEATS}: each repeat trains the real model three "
                                              "times; each extra-term variant runs once (its cost per step)",
        "trl_setting": "padded batches (packing=False, padding_free=False): TRL's padding-free path needs "
                       "FlashAttention to keep examples apart, which the CPU does not have; "
                       f"{TRL_EPOCHS} epoch(s) of the same examples (tokens/s compared, not command time)",
        "command_s": {"cl_train": _secs(ours), "naive": _secs(naive), "trl": _secs(trl),
                      "cl_train_default_rehearsal_on": _secs(default_run)},
        "command_ratio_vs_naive": command, "loop_ratio_vs_naive": loop,
        "tokens_per_s": {"cl_train": _tps(ours), "naive": _tps(naive), "trl": _tps(trl)},
        "tokens_per_s_ratio_vs_trl": vs_trl, "trl_epochs": TRL_EPOCHS, "trl_repeats": len(trl),
        "code_commit": commit_info(),
        "heldout_loss": {"cl_train": _losses(ours), "naive": _losses(naive), "trl": _losses(trl)},
        "heldout_loss_gap_vs_naive": round(gap, 4),
        "real_tokens": {"cl_train": ours[0]["real_tokens"], "naive": naive[0]["real_tokens"],
                        "trl": trl[0]["real_tokens"]},
        "padded_tokens": {"cl_train": ours[0]["padded_tokens"], "naive": naive[0]["padded_tokens"]},
        "naive_pad_share": round(pad_share, 3), "steps": {"cl_train": ours[0]["steps"], "naive": naive[0]["steps"],
                                                          "trl": trl[0]["steps"]},
        "cl_train_timings_median_s": timings,
        "seconds_per_step": {k: round(v, 3) for k, v in per_step.items()},
        "extra_seconds_per_step_by_term": term_cost,
        "peak_rss_mb": {"cl_train": max(r["peak_rss_mb"] for r in ours), "naive": max(r["peak_rss_mb"] for r in naive),
                        "trl": max(r["peak_rss_mb"] for r in trl)},
    }
    met_command = command["median"] is not None and command["median"] >= GOAL_COMMAND
    met_trl = vs_trl["median"] is not None and vs_trl["median"] >= GOAL_TRL
    met_loss = gap <= GOAL_LOSS_GAP
    goals = {"command >= 2x naive": met_command, "tokens/s >= 1.5x TRL": met_trl, "held-out loss within 2%": met_loss}
    raw["goals"] = goals
    missed = [name for name, ok in goals.items() if not ok]
    return result(
        workload=(f"`cl train`, {work.train_examples} length-skewed chat examples x {work.epochs} epochs, batch "
                  f"{work.batch_size}, {raw['model']}"),
        baseline="whole naive padded PEFT loop (same examples/epochs/LoRA/hyperparameters, own model load); "
                 "TRL SFTTrainer on the same tokens (padded batches)",
        goal=f"whole command >= {GOAL_COMMAND}x the naive loop, tokens/s >= {GOAL_TRL}x TRL, held-out loss within "
             f"{GOAL_LOSS_GAP:.0%}",
        ratio_value=command["median"], goal_met=not missed, raw=raw, ratio_spread=[command["min"], command["max"]],
        why_missed=_why_missed(goals, command, vs_trl, gap, timings) if missed else None,
        where_time_goes=(f"`cl train` (equal work, medians): {timings}. The naive loop spends {pad_share:.0%} of its "
                         f"computed positions on padding and computes the 49k-word output layer at every position; "
                         f"`cl train` packs rows ({ours[0]['padded_tokens']} pad positions against "
                         f"{naive[0]['padded_tokens']}) and computes logits only where a label follows"),
        summary=(f"Whole command: `cl train` {median(_secs(ours)):.1f} s against the naive loop "
                 f"{median(_secs(naive)):.1f} s: {_fmt(command)}; inside the loop {_fmt(loop)}. Tokens/s "
                 f"{median(_tps(ours)):.0f} against TRL SFTTrainer {median(_tps(trl)):.0f}: {_fmt(vs_trl)} (TRL: "
                 f"padded batches, {TRL_EPOCHS} epoch of the same examples, {len(trl)} run(s)). Held-out loss "
                 f"{ours_loss:.4f} vs "
                 f"naive {naive_loss:.4f} ({gap:.2%} apart; TRL after its {TRL_EPOCHS} epoch: {trl_loss:.4f}). "
                 f"Extra seconds per step, one run each: the rehearsal KL term (default `cl train`) "
                 f"{term_cost.get('kl_rehearsal')} s over {per_step['none']:.2f} s without; the preference term "
                 f"(KTO on {len(range(0, work.train_examples, REJECTED_PER_EXAMPLE))} answers rated \"no\", objective auto) "
                 f"{term_cost.get('kto_preference')} s over SFT alone on the same snapshot "
                 f"({per_step.get('sft_on_preference_snapshot', 0.0):.2f} s); the default command took "
                 f"{median(_secs(default_run)):.1f} s. "
                 + (f"Goals missed: {', '.join(missed)}. " if missed else "All three goals met. ")
                 + f"This workload's code: commit {raw['code_commit']['sha'][:12]}."),
    )


def _why_missed(goals: dict, command: dict, vs_trl: dict, gap: float, timings: dict) -> str:
    reasons = []
    if not goals["command >= 2x naive"]:
        outside = timings.get("setup_s", 0.0) + timings.get("held_out_s", 0.0) + timings.get("save_s", 0.0)
        reasons.append(f"the whole command is {command['median']}x the naive loop, not {GOAL_COMMAND}x: of its time, "
                       f"{outside:.1f} s (setup: imports, model load, tokenizing; held-out loss; saving) is outside "
                       f"the loop, where there is no padding to save")
    if not goals["tokens/s >= 1.5x TRL"]:
        reasons.append(f"tokens/s is {vs_trl['median']}x TRL SFTTrainer's, not {GOAL_TRL}x")
    if not goals["held-out loss within 2%"]:
        reasons.append(f"held-out loss is {gap:.2%} from the naive loop's")
    return "; ".join(reasons)


def _secs(rows: list[dict]) -> list[float]:
    return [round(r["seconds"], 2) for r in rows]


def _tps(rows: list[dict]) -> list[float]:
    return [round(r["tokens_per_s"], 1) for r in rows]


def _losses(rows: list[dict]) -> list[float]:
    return [round(r["heldout_loss"], 4) for r in rows]


def _fmt(ratios: dict) -> str:
    return f"{ratios['median']}x (median of {len(ratios['per_repeat'])}, {spread(ratios)})"
