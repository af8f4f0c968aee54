"""The [train] settings as the recipe reads them: the step budget, the learning-rate schedule and the values behind
`--steps` / `--epochs`. Pure functions, tested without a model. The knobs' range checks live in the config itself
(`TrainConfig.__post_init__`), so a bad value is refused when the settings are built, before anything heavy."""
from __future__ import annotations

import math

from ..core.settings import TrainConfig

MAX_GRAD_NORM = 1.0  # gradient clipping (the usual HF default); recorded in the lineage
EPOCHS_FLAG_CEILING = 1_000_000  # `--epochs N` means N passes, however many steps that takes


def validate_train_config(cfg: TrainConfig) -> None:
    """Kept for importers: a TrainConfig validates itself when it is built (`TrainConfig.__post_init__`)."""
    cfg.__post_init__()


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
