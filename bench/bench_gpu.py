"""`make bench-gpu` / `python -m bench --gpu`: training and eval on CUDA, when torch sees a GPU.

- training: QLoRA (NF4 base, bf16 compute) through the project's Trainer against the naive padded HF + PEFT loop
  (bench/naive_train.py) on the same GPU, the same examples, epochs, LoRA and hyperparameters: tokens/s and peak GPU
  memory (torch.cuda.max_memory_allocated), plus held-out loss;
- eval: the project's batched runner against HF `generate` batched with left padding at the same batch size.

The model is the largest of LARGER_MODELS already in the Hugging Face cache (nothing is downloaded), else the
bundled SmolLM2. Without a GPU it measures nothing and says so."""
from __future__ import annotations

import dataclasses
import shutil
import sys

from .common import median, paired_ratios, result, spread, timed
from .workspaces import apply_env, new_home, workspace_env

LARGER_MODELS = ("Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-3B-Instruct", "Qwen/Qwen2.5-1.5B-Instruct",
                 "HuggingFaceTB/SmolLM2-1.7B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct")


def cached_model() -> str | None:
    """The first of LARGER_MODELS with a snapshot in the local Hugging Face cache."""
    try:
        from huggingface_hub import scan_cache_dir

        cached = {repo.repo_id for repo in scan_cache_dir().repos if repo.repo_type == "model"}
    except Exception:  # no cache folder yet, or an unreadable one: the bundled model it is
        return None
    return next((name for name in LARGER_MODELS if name in cached), None)


def no_gpu() -> dict:
    import torch

    why = (f"no CUDA GPU: torch {torch.__version__} sees none (torch.cuda.is_available() is False); "
           "nothing was measured. Run `make bench-gpu` on a machine with a GPU and a CUDA build of torch.")
    return result(workload="training and eval on CUDA", baseline="HF + PEFT on the same GPU", goal="figures only",
                  ratio_value=None, goal_met=False, raw={"gpu": None}, where_time_goes="not measured",
                  summary=why, why_missed=why, no_gpu=True)


def run(repeats: int, quick: bool) -> dict:
    import torch

    if not torch.cuda.is_available():
        return no_gpu()
    home = new_home("gpu")
    env = workspace_env(home, CL_MODEL_THREADS="0")
    model = cached_model()
    if model:
        env["CL_BASE_MODEL"] = model
    apply_env(env)
    try:
        training = _training(home, env, max(1, repeats), quick)
        evaluation = _eval(max(1, repeats), quick)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    return _report(model, torch.cuda.get_device_name(0), training, evaluation)


def _training(home, env: dict, repeats: int, quick: bool) -> dict:
    import torch

    from . import bench_train
    from .naive_train import main as _unused  # noqa: F401  (fails early if a dependency is missing)
    from continuous_learning.chat.models import resolve_base
    from continuous_learning.core.settings import load_settings
    from continuous_learning.train import Trainer

    work = dataclasses.replace(bench_train.QUICK if quick else bench_train.FULL, tiny_model=False, batch_size=8)
    settings = load_settings()
    settings = dataclasses.replace(settings, train=dataclasses.replace(
        settings.train, rehearsal="off", epochs=work.epochs, min_steps=0, batch_size=work.batch_size,
        max_seq_len=work.max_seq_len, checkpoint_every=0))
    train = bench_train.snapshot_records(work.train_examples, work.long_share, work.long_words, seed=1)
    held = bench_train.snapshot_records(work.eval_examples, work.long_share, work.long_words, seed=2)
    train_path, eval_path = bench_train.write_snapshot(settings, train, held)
    base_dir = resolve_base(settings).path
    ours, naive = [], []
    for _ in range(repeats):
        naive.append(bench_train.baseline("naive", env, work, base_dir, train_path, eval_path, settings.train))
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        trainer = Trainer(settings, fresh=True)
        try:
            trainer.setup()
            metrics = trainer.train()
            ours.append({"tokens_per_s": metrics["tokens_per_s"], "train_s": metrics["seconds"],
                         "heldout_loss": metrics.get("eval_loss"),
                         "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20})
        finally:
            run_dir = trainer.run_dir
            trainer.cleanup()
            if run_dir is not None:
                shutil.rmtree(run_dir, ignore_errors=True)
    return {"ours": ours, "naive": naive, "work": dataclasses.asdict(work),
            "tokens_per_s_ratio": paired_ratios([r["tokens_per_s"] for r in ours], [r["tokens_per_s"] for r in naive])}


def _eval(repeats: int, quick: bool) -> dict:
    from .bench_eval import eval_items
    from continuous_learning.evaluate import answer_in_batches, question_conversations
    from continuous_learning.evaluate.generation import batch_rows
    from continuous_learning.chat.models import ChatModel
    from continuous_learning.core.settings import load_settings

    settings = load_settings()
    conversations = question_conversations(settings, eval_items(8 if quick else 64))
    chat = ChatModel.load(settings)
    chat.generate_batch(conversations[:2], max_new_tokens=4, batch_size=2)
    ours_s, base_s = [], []
    rows = batch_rows(chat, conversations, settings)  # the batch the runner uses, for HF too
    for _ in range(repeats):
        took, base_out = timed(lambda: chat.generate_batch(conversations, settings.eval.max_new_tokens, rows))
        base_s.append(took)
        took, ours_out = timed(lambda: answer_in_batches(chat, conversations, settings)[0])
        ours_s.append(took)
    return {"ours_s": ours_s, "hf_batched_s": base_s, "ratio": paired_ratios(base_s, ours_s),
            "same_answers": sum(a == b for a, b in zip(ours_out, base_out)), "prompts": len(conversations)}


def _report(model: str | None, gpu: str, training: dict, evaluation: dict) -> dict:
    ours, naive = training["ours"], training["naive"]
    tps = training["tokens_per_s_ratio"]
    raw = {"gpu": gpu, "model": model or "bundled SmolLM2-135M-Instruct", "training": training, "eval": evaluation,
           "peak_gpu_mb": {"ours": max(r["peak_gpu_mb"] for r in ours),
                           "naive": max(r["peak_gpu_mb"] or 0 for r in naive)}}
    return result(
        workload=f"QLoRA training and eval on {gpu}, {raw['model']}",
        baseline="naive padded HF + PEFT loop on the same GPU; HF generate batched with left padding",
        goal="figures only (no CPU goal applies)",
        ratio_value=tps["median"], goal_met=True, raw=raw, ratio_spread=[tps["min"], tps["max"]],
        where_time_goes="not profiled on the GPU",
        summary=(f"training {median([r['tokens_per_s'] for r in ours]):.0f} real tokens/s against the naive loop's "
                 f"{median([r['tokens_per_s'] for r in naive]):.0f} ({tps['median']}x, {spread(tps)}); peak GPU "
                 f"memory {raw['peak_gpu_mb']['ours']:.0f} MB against {raw['peak_gpu_mb']['naive']:.0f} MB; held-out "
                 f"loss {median([r['heldout_loss'] for r in ours]):.4f} against "
                 f"{median([r['heldout_loss'] for r in naive]):.4f}. Eval: {evaluation['ratio']['median']}x batched "
                 f"generate ({spread(evaluation['ratio'])}), {evaluation['same_answers']}/{evaluation['prompts']} "
                 "answers identical."),
    )


if __name__ == "__main__":
    import orjson

    sys.stdout.write(orjson.dumps(run(1, "--quick" in sys.argv), option=orjson.OPT_INDENT_2).decode() + "\n")
