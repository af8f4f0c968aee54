"""The [train] settings as the recipe reads them: validation before any heavy work, the step budget, the
learning-rate schedule and the values behind `--steps` / `--epochs`. Pure functions, tested without a model."""
from __future__ import annotations

import math

from ..core.errors import ConfigError
from ..core.settings import TrainConfig
from . import preference

MAX_GRAD_NORM = 1.0  # gradient clipping (the usual HF default); recorded in the lineage
REHEARSAL_MODES = ("kl", "sft", "off")
EPOCHS_FLAG_CEILING = 1_000_000  # `--epochs N` means N passes, however many steps that takes


def validate_train_config(cfg: TrainConfig) -> None:
    """Reject impossible hyperparameters before anything heavy is loaded; names every bad field."""
    checks = [
        (cfg.lora_r >= 1, f"train.lora_r must be >= 1 (got {cfg.lora_r})"),
        (math.isfinite(cfg.lora_alpha) and cfg.lora_alpha > 0, f"train.lora_alpha must be > 0 (got {cfg.lora_alpha})"),
        (0.0 <= cfg.lora_dropout < 1.0, f"train.lora_dropout must be in [0, 1) (got {cfg.lora_dropout})"),
        (bool(target_modules(cfg)),
         "train.target_modules is empty (use 'all-linear' or names like 'q_proj,v_proj')"),
        (math.isfinite(cfg.learning_rate) and cfg.learning_rate > 0,
         f"train.learning_rate must be a positive number (got {cfg.learning_rate})"),
        (cfg.epochs >= 0, f"train.epochs must be >= 0 (got {cfg.epochs})"),
        (cfg.max_steps >= 1, f"train.max_steps must be >= 1 (got {cfg.max_steps})"),
        (cfg.min_steps >= 0, f"train.min_steps must be >= 0 (got {cfg.min_steps}; max_steps wins when it is lower)"),
        (cfg.batch_size >= 1, f"train.batch_size must be >= 1 (got {cfg.batch_size})"),
        (cfg.grad_accum >= 1, f"train.grad_accum must be >= 1 (got {cfg.grad_accum})"),
        (cfg.max_seq_len >= 8, f"train.max_seq_len must be >= 8 (got {cfg.max_seq_len})"),
        (0.0 <= cfg.warmup_ratio < 1.0, f"train.warmup_ratio must be in [0, 1) (got {cfg.warmup_ratio})"),
        (math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0,
         f"train.weight_decay must be >= 0 (got {cfg.weight_decay})"),
        (cfg.checkpoint_every >= 0, f"train.checkpoint_every must be >= 0 (got {cfg.checkpoint_every}; 0 = never)"),
        (cfg.seed >= 0, f"train.seed must be >= 0 (got {cfg.seed})"),
        (cfg.num_processes >= 1, f"train.num_processes must be >= 1 (got {cfg.num_processes})"),
        (cfg.rehearsal in REHEARSAL_MODES,
         f"train.rehearsal must be one of {', '.join(REHEARSAL_MODES)} (got {cfg.rehearsal!r})"),
        (cfg.rehearsal_examples >= 0, f"train.rehearsal_examples must be >= 0 (got {cfg.rehearsal_examples})"),
        (cfg.rehearsal_per_step >= 1, f"train.rehearsal_per_step must be >= 1 (got {cfg.rehearsal_per_step})"),
        (math.isfinite(cfg.rehearsal_weight) and cfg.rehearsal_weight >= 0,
         f"train.rehearsal_weight must be >= 0 (got {cfg.rehearsal_weight})"),
        (cfg.objective in preference.OBJECTIVES,
         f"train.objective must be one of {', '.join(preference.OBJECTIVES)} (got {cfg.objective!r})"),
    ]
    problems = [text for ok, text in checks if not ok]
    if problems:
        raise ConfigError("; ".join(problems),
                          "change the flag, the [train] section of cl.toml or the CL_TRAIN_* variable")


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
