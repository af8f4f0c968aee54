"""The recipe's parts called the way the Trainer calls them, on a set-up Trainer: what the training tests inspect
(one step's examples and micro-batches, their losses) without the recipe keeping test-only methods."""
from __future__ import annotations

from continuous_learning.train import losses, plan
from continuous_learning.train.collate import Batch, collate_padded
from continuous_learning.train.collate import micro_batches as collate_micro_batches


def collate(trainer, batch: list[dict]):
    """(ids, mask, labels, weights) of padded rows."""
    b = collate_padded(batch, trainer.pad_id, trainer.device)
    return b.ids, b.mask, b.labels, b.token_weights[:, 0]


def token_losses(trainer, ids, mask, labels, position_ids=None):
    """Per-token cross-entropy (fp32) of the labelled positions, and the labelled mask."""
    return losses.forward_losses(trainer.forward, trainer.model, ids, mask, labels, position_ids)[:2]


def batch_terms(trainer, batch: Batch):
    return losses.batch_terms(trainer.forward, trainer.model, batch)


def batch_losses(trainer, batch: Batch):
    """(per-token losses, labelled mask, per-token weights, rehearsal KL sum or None) of one Batch."""
    return batch_terms(trainer, batch)[:4]


def step_examples(trainer, step: int) -> list[dict]:
    return plan.step_examples(trainer.data.examples, trainer.cfg, step, trainer.world, trainer.data.lengths)


def step_undesirable(trainer, step: int) -> list[dict]:
    return plan.step_undesirable(trainer.data.undesirable, trainer.cfg, step, trainer.world, trainer.rank)


def micro_batches(trainer, examples: list[dict], rehearsal: list[dict] = (), undesirable: list[dict] = ()):
    return collate_micro_batches(trainer.cfg, examples, list(rehearsal), list(undesirable), trainer.pad_id,
                                 trainer.device)


def evaluate_loss(trainer, examples: list[dict]) -> dict:
    return losses.held_out_loss(trainer.forward, trainer.model, examples, trainer.cfg.batch_size, trainer.pad_id)
