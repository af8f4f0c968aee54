"""One optimizer step: how its terms are normalised, forward and backward over its micro-batches (gradients
synchronised over the processes on the last one only), the sums over processes, clipping and the update."""
from __future__ import annotations

import contextlib
import dataclasses
import math

from .config import MAX_GRAD_NORM
from .encode import label_count
from .launcher import sum_over_processes
from .losses import Forward, NonFiniteLoss, StepScale, batch_objective, preference_plan


def step_scale(everyone: list[dict], mine: list[dict], rehearsal: list[dict], undesirable: list[dict], world: int,
               rehearsal_weight: float, preference_weight: float) -> StepScale:
    """The normalisation of a step whose examples over all processes are `everyone` (this process: `mine`)."""
    label_tokens = max(1, sum(label_count(e) for e in everyone))
    terms, class_weights = preference_plan(mine, undesirable)
    # DDP averages gradients over processes; the objective is a global sum, so scale it back up
    return StepScale(world / label_tokens, max(1, sum(label_count(e) for e in rehearsal)), rehearsal_weight, terms,
                     class_weights, preference_weight, label_tokens)


@dataclasses.dataclass(frozen=True)
class StepResult:
    sums: list[float]  # see losses.batch_objective, summed over micro-batches and processes
    grad_norm: float
    lr: float


def optimizer_step(forward: Forward, model, batches: list, scale: StepScale, params: list, optimizer, scheduler,
                   world: int, step: int) -> StepResult:
    """Backward over `batches` through `model` (DDP-wrapped with several processes), then clip and update.
    Raises NonFiniteLoss on a NaN/inf loss or gradient norm (`step` counts from 0)."""
    import torch

    sums = torch.zeros(6, dtype=torch.float64)
    for k, batch in enumerate(batches):
        last = k == len(batches) - 1
        with contextlib.nullcontext() if last or world == 1 else model.no_sync():
            objective, parts = batch_objective(forward, model, batch, scale)
            if not torch.isfinite(objective):
                raise NonFiniteLoss(f"loss became {objective.item()} at step {step + 1}")
            objective.backward()
        sums += torch.tensor(parts, dtype=torch.float64)
    sums = sum_over_processes(sums, world, forward.device)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM))
    if not math.isfinite(grad_norm):
        raise NonFiniteLoss(f"gradient norm became {grad_norm} at step {step + 1}")
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(sums.tolist(), grad_norm, lr)
