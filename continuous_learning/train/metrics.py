"""What a run reports and records: the metrics row of each step, the ETA, the run's summary, the loss curve,
and the training config and lineage saved beside the adapter."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from ..core.records import utc_now
from ..core.settings import TrainConfig
from ..storage.store import atomic_write_bytes
from .config import MAX_GRAD_NORM, step_size, warmup_steps
from .data import RunData


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


def step_row(step: int, sums: list[float], label_tokens: int, lr: float, grad_norm: float, seconds: float,
             elapsed_before: float, kl_divisor: int | None, preference_divisor: int | None) -> dict:
    """The metrics row of one step from its summed parts (see losses.batch_objective); the KL and preference
    columns are None when the run has no such term (else divided by the process count given)."""
    real, padded = int(sums[2]), int(sums[3])
    return {
        "step": step,
        "loss": float(sums[0]) / label_tokens,
        "weighted_loss": float(sums[1]) / label_tokens,
        "lr": lr,
        "grad_norm": grad_norm,
        "tokens": real,
        "real_tokens": real,
        "padded_tokens": padded,
        "label_tokens": label_tokens,
        "rehearsal_kl": float(sums[4]) / kl_divisor if kl_divisor else None,
        "preference_loss": float(sums[5]) / preference_divisor if preference_divisor else None,
        "seconds": seconds,
        "tokens_per_s": real / seconds if seconds > 0 else 0.0,  # real (non-pad) tokens
        "elapsed_s": elapsed_before + seconds,
        "time": utc_now(),
    }


def eta_seconds(session_seconds: float, steps_done: int, steps_left: int) -> float:
    """Seconds left, at the pace of the steps this session has run."""
    return session_seconds / steps_done * steps_left


def loss_summary(history: list[dict], records: int, cfg: TrainConfig, world: int) -> dict:
    """The run's first, final (over about one pass) and last step losses."""
    losses = [r["loss"] for r in history]
    window = max(1, math.ceil(records / step_size(cfg, world)))
    return {
        "final_loss": final_window(losses, window),
        "initial_loss": sum(losses[:window]) / len(losses[:window]) if losses else None,
        "last_step_loss": losses[-1] if losses else None,
    }


def token_summary(history: list[dict]) -> dict:
    """The run's token counts, time and speed."""
    train_tokens = sum(r["tokens"] for r in history)
    seconds = sum(r["seconds"] for r in history)
    return {
        "train_tokens": train_tokens,
        "real_tokens": train_tokens,
        "padded_tokens": sum(r.get("padded_tokens", 0) for r in history),
        "tokens_per_s": train_tokens / seconds if seconds > 0 else 0.0,
        "seconds": seconds,
    }


def run_summary(history: list[dict], data: RunData, cfg: TrainConfig, step: int, start_step: int, device,
                world: int) -> dict:
    """The metrics a finished run registers (before its held-out loss and answer likelihoods)."""
    return {
        **loss_summary(history, data.records, cfg, world),
        "steps": step,
        "examples": data.records,
        "objective": data.objective["name"],
        "undesirable_examples": data.undesirable_records,
        "pairs": len({e["record"] for e in data.examples if "rejected_item" in e}),
        "prompt_variants": len(data.examples),
        "rehearsal": cfg.rehearsal if data.anchors or cfg.rehearsal == "off" else "off",
        "eval_examples": len(data.eval_examples),
        **token_summary(history),
        "resumed_at_step": start_step or None,
        "device": str(device),
        "processes": world,
        "packing": cfg.packing,
    }


def training_config(cfg: TrainConfig, steps: int, model_settings, base, snapshot: dict, snapshot_sha256: str,
                    warm_start: dict, device, autocast: bool, world: int) -> dict:
    """The resolved configuration saved inside the adapter folder (training_config.json)."""
    return {
        "train": dataclasses.asdict(cfg),
        "max_grad_norm": MAX_GRAD_NORM,
        "steps": steps,
        "warmup_steps": warmup_steps(cfg, steps),
        "model": dataclasses.asdict(model_settings),
        "base_model": {"name": base.name, "sha256": base.sha256, "path": base.path},
        "snapshot": {"id": snapshot["id"], "sha256": snapshot_sha256, "file": snapshot.get("file")},
        "warm_start": warm_start,
        "device": str(device),
        "autocast_bf16": autocast,
        "processes": world,
    }


def lineage(version: str, base, snapshot: dict, snapshot_sha256: str, parent: str | None, warm_start: dict,
            cfg: TrainConfig, note: str | None, started_at: str) -> dict:
    """Where an adapter came from: base, snapshot, parent, hyperparameters, libraries, whose data it saw."""
    return {
        "version": version,
        "base_model": {"name": base.name, "sha256": base.sha256},
        "snapshot": {"id": snapshot["id"], "sha256": snapshot_sha256},
        "parent": parent,
        "warm_start": warm_start,
        "hyperparameters": {**dataclasses.asdict(cfg), "max_grad_norm": MAX_GRAD_NORM},
        "library_versions": library_versions(),
        "user_hashes": list(snapshot.get("user_hashes") or []),
        "note": note,
        "started_at": started_at,
    }


def write_loss_curve(run_dir: Path, history: list[dict]) -> None:
    """loss_curve.csv: step, loss, learning rate, tokens/s (plotting it with matplotlib cost a second per run)."""
    lines = ["step,loss,lr,tokens_per_s"]
    lines += [f"{r['step']},{r['loss']:.6f},{r['lr']:.6g},{r['tokens_per_s']:.2f}" for r in history]
    atomic_write_bytes(run_dir / "loss_curve.csv", ("\n".join(lines) + "\n").encode())
