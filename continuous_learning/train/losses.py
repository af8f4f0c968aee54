"""The losses: SFT cross-entropy on the labelled answer tokens, the KL rehearsal term toward the frozen base,
the preference terms' answer log-probs, and the measurements built on them (held-out loss, answer likelihoods).
Only logits that predict a labelled token are computed. torch is imported inside functions."""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from . import preference
from .collate import Batch, KlTargets, SequenceTargets, collate_padded, loss_positions
from .encode import IGNORE_INDEX
from .model_build import keep_bnb_training_layout


class NonFiniteLoss(Exception):
    """A NaN/inf loss or gradient: turned into TrainingFailed by run_training."""


@dataclasses.dataclass(frozen=True)
class Forward:
    """How the trained model is called: its device, bf16 autocast or not, and whether its forward takes
    `logits_to_keep` (then the lm_head runs only where a loss needs it)."""

    device: Any
    autocast: bool
    logits_to_keep: bool

    def logits(self, model, ids, mask, needed, position_ids=None):
        """fp32 logits at the positions `needed`, shape (rows, len(needed), vocab)."""
        import torch

        kwargs = {"logits_to_keep": needed} if self.logits_to_keep else {}
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            out = model(input_ids=ids, attention_mask=mask, use_cache=False, **kwargs)
        logits = out.logits.float()
        return logits if logits.shape[1] == len(needed) else logits[:, needed]


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


def forward_losses(forward: Forward, model, ids, mask, labels, position_ids=None,
                   reference: KlTargets | None = None, sequences: SequenceTargets | None = None):
    """(losses, labelled, target positions, KL sum, answer log-probs): logits only where some row has a
    labelled next token. Rehearsal positions (`reference`) give a KL term toward the base instead of a
    cross-entropy; `sequences` get their summed log-probs, and those only pushed down leave the SFT loss."""
    import torch

    needed = loss_positions(labels)
    logits = forward.logits(model, ids, mask, needed, position_ids)
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


def batch_terms(forward: Forward, model, batch: Batch):
    """(per-token losses, labelled mask, per-token weights, rehearsal KL sum or None, preference answers'
    summed log-probs or None) of one Batch."""
    losses, labelled, targets, kl, sequence_logp = forward_losses(
        forward, model, batch.ids, batch.mask, batch.labels, batch.position_ids, batch.reference, batch.sequences)
    return losses, labelled, batch.token_weights[:, targets], kl, sequence_logp


@dataclasses.dataclass(frozen=True)
class StepScale:
    """How the terms of one optimizer step are normalised. The SFT objective is sum(weight x token loss) / labelled
    tokens of the whole (global) step, times the process count because DDP averages gradients over processes; the
    KL term is a mean per rehearsal token, the preference loss a mean per term of this process's step."""

    sft: float
    rehearsal_tokens: int
    rehearsal_weight: float
    preference_terms: int
    class_weights: tuple[float, float]
    preference_weight: float
    label_tokens: int = 1  # labelled tokens of the whole step


def preference_plan(examples: list[dict], undesirable: list[dict]) -> tuple[int, tuple[float, float]]:
    """How many preference terms a process's step holds, and KTO's class weights for its counts."""
    desirable = sum(1 for e in examples if e.get("pref_term") == preference.KTO_DESIRABLE)
    pairs = sum(1 for e in examples if e.get("pref_term") == preference.DPO_CHOSEN)
    return desirable + pairs + len(undesirable), preference.kto_class_weights(desirable, len(undesirable))


def batch_objective(forward: Forward, model, batch: Batch, scale: StepScale):
    """(objective to backpropagate, its parts as floats: loss sum, weighted loss sum, real tokens, pad tokens,
    rehearsal KL per token, preference loss per term) of one forward pass."""
    losses, _, weights, kl, sequence_logp = batch_terms(forward, model, batch)
    weighted = (weights * losses).sum()
    objective = weighted * scale.sft
    if kl is not None:  # mean KL per rehearsal token of this process; DDP averages the processes
        objective = objective + scale.rehearsal_weight * kl / scale.rehearsal_tokens
    pref = 0.0
    terms = max(1, scale.preference_terms)
    if sequence_logp is not None:  # mean preference loss per term of this process's step
        pref_sum, _ = preference.batch_preference_loss(sequence_logp, batch.sequences.items, scale.class_weights)
        objective = objective + scale.preference_weight * pref_sum / terms
        pref = float(pref_sum.detach())
    kl_value = float(kl.detach()) / scale.rehearsal_tokens if kl is not None else 0.0
    parts = [float(losses.detach().sum()), float(weighted.detach()), batch.real_tokens, batch.padded_tokens,
             kl_value, pref / terms]
    return objective, parts


def _eval_mode(model):
    """Eval mode for a measurement, with bitsandbytes' training layout kept; returns whether it was training."""
    was_training = model.training
    model.eval()
    keep_bnb_training_layout(model)
    return was_training


def held_out_loss(forward: Forward, model, examples: list[dict], batch_size: int, pad_id: int) -> dict:
    """Unweighted mean token loss (and perplexity) of the final assistant answers of `examples`."""
    import torch

    was_training = _eval_mode(model)
    total = count = 0.0
    try:
        with torch.no_grad():
            for start in range(0, len(examples), max(1, batch_size)):
                b = collate_padded(examples[start : start + max(1, batch_size)], pad_id, forward.device)
                losses, labelled, _, _, _ = forward_losses(forward, model, b.ids, b.mask, b.labels)
                total += float((losses * labelled).sum())
                count += float(labelled.sum())
    finally:
        if was_training:
            model.train()
    loss = total / count if count else float("nan")
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)) if count else float("nan"), "tokens": int(count)}


def preference_logliks(forward: Forward, model, answers: dict, pad_id: int) -> dict:
    """Mean per-token log-likelihood (nats) of the rejected and of the chosen/desirable answers in `answers`
    (the run's preference_eval sets), each answer's mean first (as a user would see each answer), then their mean."""
    if not answers:
        return {}
    out = {f"{name}_loglik": preference.mean_loglik(answer_logliks(forward, model, answers[name], pad_id))
           for name in ("rejected", "chosen")}
    out.update(preference_eval=answers["source"], rejected_answers=len(answers["rejected"]),
               chosen_answers=len(answers["chosen"]))
    return out


def answer_logliks(forward: Forward, model, examples: list[dict], pad_id: int, batch_size: int = 8) -> list[float]:
    """Mean per-token log-likelihood (nats) of each example's labelled answer, in order."""
    import torch

    was_training = _eval_mode(model)
    values: list[float] = []
    try:
        with torch.no_grad():
            for start in range(0, len(examples), batch_size):
                chunk = [{**e, "weight": 1.0} for e in examples[start : start + batch_size]]
                b = collate_padded(chunk, pad_id, forward.device)
                losses, labelled, _, _, _ = forward_losses(forward, model, b.ids, b.mask, b.labels)
                values += (-(losses.sum(-1)) / labelled.sum(-1).clamp(min=1)).tolist()
    finally:
        if was_training:
            model.train()
    return values
