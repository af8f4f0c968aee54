"""Learning from "no": what a rating means for training, the preference losses, and the snapshot fields for them.

A helpful turn is a *desirable* answer, an unhelpful one an *undesirable* answer, a correction a *pair* (chosen =
the correction, rejected = the model's answer). Training keeps SFT on the desirable answers and corrections and adds

- KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", arXiv:2402.01306) for
  unpaired answers: with r = log p(y|x) - log p_ref(y|x) summed over the answer, a desirable answer costs
  lambda_D (1 - sigmoid(beta (r - z0))) and an undesirable one lambda_U (1 - sigmoid(beta (z0 - r)));
- DPO (Rafailov et al. 2023, "Direct Preference Optimization", arXiv:2305.18290) for pairs:
  -log sigmoid(beta ((r_chosen) - (r_rejected))).

The reference p_ref is the frozen base (the adapter disabled), computed once per run. z0, KTO's reference point
(an estimate of KL(policy || reference)), is held at 0 here: the KL rehearsal term already holds the policy near
the base on everyday prompts, and estimating z0 would cost a forward pass on mismatched pairs every step.

Snapshot records carry the fields TRL's trainers read: every record `prompt` / `completion` / `label` (KTOTrainer),
pairs also `chosen` / `rejected` (DPOTrainer), in the conversational form (lists of role/content messages).
torch is imported inside the loss functions only.
"""
from __future__ import annotations

import math
from typing import Any

from ..core.settings import OBJECTIVES
from ..storage.crypto import Cipher, decrypt_text, encrypt_text

# Log-ratios enter the losses per token (the sum over the answer divided by its length, as SimPO, Meng et al. 2024,
# does for DPO): with sums, a long answer saturates the loss after a small per-token change and a short one needs
# a large one; per token, every answer is pushed until it is about 3 / BETA nats per token below the base (in the
# 4-bit model that trains; the full-precision model a peer loads sees about half of that drop).
BETA = 1.0  # per token: the loss flattens once a rejected answer is ~3 nats/token less likely than under the base
# The preference terms' weight beside the SFT loss and the KL term is `train.preference_weight` (README).
DESIRABLE_RATIO = (1.0, 4.0 / 3.0)  # KTO §4.2: lambda_D n_D / (lambda_U n_U) should lie in [1, 4/3]
TRL_TEXT_FIELDS = ("prompt", "completion", "chosen", "rejected")
DESIRABLE, UNDESIRABLE, PAIR = "desirable", "undesirable", "pair"
# What a preference term scores in a batch; the first two are also SFT targets, the others are only pushed down.
KTO_DESIRABLE, KTO_UNDESIRABLE = "kto_desirable", "kto_undesirable"
DPO_CHOSEN, DPO_REJECTED = "dpo_chosen", "dpo_rejected"
SFT_TERMS = (KTO_DESIRABLE, DPO_CHOSEN)


# --- the losses ---------------------------------------------------------------------------------------------
def kto_losses(policy_logp, reference_logp, desirable, beta: float = BETA, z0: float = 0.0,
               desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
    """Per-example KTO loss. policy_logp, reference_logp: (N,) summed log-probs of each answer; desirable: (N,) bool."""
    import torch

    ratio = policy_logp - reference_logp
    gain = desirable_weight * (1.0 - torch.sigmoid(beta * (ratio - z0)))
    loss_aversion = undesirable_weight * (1.0 - torch.sigmoid(beta * (z0 - ratio)))
    return torch.where(desirable, gain, loss_aversion)


def dpo_losses(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta: float = BETA):
    """Per-pair DPO loss from summed log-probs of the chosen and rejected answers (all shape (N,))."""
    import torch.nn.functional as F

    margin = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
    return -F.logsigmoid(beta * margin)


def kto_class_weights(n_desirable: int, n_undesirable: int) -> tuple[float, float]:
    """(lambda_D, lambda_U): one of them raised so that lambda_D n_D / (lambda_U n_U) lands in [1, 4/3] (KTO §4.2,
    TRL's KTOConfig advice: set one weight, not both). Counts are what the loss sees (examples per step)."""
    if n_desirable <= 0 or n_undesirable <= 0:
        return 1.0, 1.0
    ratio = n_desirable / n_undesirable
    low, high = DESIRABLE_RATIO
    if ratio < low:  # more "no" than "yes": weigh each desirable answer up
        return low / ratio, 1.0
    if ratio > high:  # more "yes" than "no": weigh each undesirable answer up
        return 1.0, ratio / high
    return 1.0, 1.0


def batch_preference_loss(sequence_logp, items: list[dict], class_weights: tuple[float, float], beta: float = BETA):
    """(sum of the KTO and DPO losses of one forward pass, number of terms). `sequence_logp[i]` is the policy's
    summed log-prob of `items[i]`, whose `pref_term` says what it is, `ref_logp` the base's summed log-prob and
    `tokens` how many tokens both sum over; a DPO chosen answer names its rejected one (`rejected_item`), which
    is in the same pass. Log-probs enter the losses per token (see BETA)."""
    import torch

    lengths = sequence_logp.new_tensor([float(item.get("tokens", 1)) for item in items]).clamp(min=1.0)
    sequence_logp = sequence_logp / lengths
    originals = items
    items = [{**item, "ref_logp": item["ref_logp"] / max(1, item.get("tokens", 1))} for item in items]
    index = {id(item): i for i, item in enumerate(originals)}
    kto = [i for i, item in enumerate(items) if item["pref_term"] in (KTO_DESIRABLE, KTO_UNDESIRABLE)]
    pairs = [(i, index[id(item["rejected_item"])]) for i, item in enumerate(originals)
             if item["pref_term"] == DPO_CHOSEN]
    total = sequence_logp.new_zeros(())
    if kto:
        at = torch.tensor(kto, device=sequence_logp.device)
        reference = sequence_logp.new_tensor([items[i]["ref_logp"] for i in kto])
        desirable = torch.tensor([items[i]["pref_term"] == KTO_DESIRABLE for i in kto], device=sequence_logp.device)
        weights = sequence_logp.new_tensor([items[i].get("pref_weight", 1.0) for i in kto])
        losses = kto_losses(sequence_logp[at], reference, desirable, beta, 0.0, *class_weights)
        total = total + (weights * losses).sum()
    if pairs:
        chosen = torch.tensor([c for c, _ in pairs], device=sequence_logp.device)
        rejected = torch.tensor([r for _, r in pairs], device=sequence_logp.device)
        total = total + dpo_losses(sequence_logp[chosen], sequence_logp[rejected],
                                   sequence_logp.new_tensor([items[c]["ref_logp"] for c, _ in pairs]),
                                   sequence_logp.new_tensor([items[r]["ref_logp"] for _, r in pairs]), beta).sum()
    return total, len(kto) + len(pairs)


# --- choosing the objective ---------------------------------------------------------------------------------
def resolve_objective(setting: str, undesirable: int, pairs: int) -> dict:
    """Which terms train beside SFT: {"name", "kto", "dpo", "pairs_as_kto", "ignored"}.

    auto: KTO for unpaired undesirable answers, DPO for pairs, plain SFT when the snapshot has neither.
    kto: pairs are split into a desirable and an undesirable answer. dpo: pairs only (unpaired "no" is ignored).
    sft: today's behaviour (corrections are SFT targets, unpaired "no" is ignored)."""
    if setting not in OBJECTIVES:
        raise ValueError(f"unknown objective {setting!r}")
    kto = (setting in ("auto", "kto") and undesirable > 0) or (setting == "kto" and pairs > 0)
    dpo = setting in ("auto", "dpo") and pairs > 0
    ignored = undesirable if setting in ("sft", "dpo") else 0
    ignored += pairs if setting == "sft" else 0
    name = "+".join(["sft"] + (["kto"] if kto else []) + (["dpo"] if dpo else []))
    return {"name": name, "kto": kto, "dpo": dpo, "pairs_as_kto": setting == "kto", "ignored": ignored}


# --- snapshot fields -----------------------------------------------------------------------------------------
def trl_fields(messages: list[dict], desirable: bool, rejected: str | None = None) -> dict:
    """The TRL view of one example: prompt/completion/label, and chosen/rejected for a pair."""
    prompt = [{"role": m["role"], "content": m["content"]} for m in messages[:-1]]
    completion = [{"role": "assistant", "content": messages[-1]["content"]}]
    fields: dict[str, Any] = {"prompt": prompt, "completion": completion, "label": bool(desirable)}
    if rejected is not None:
        fields.update(chosen=completion, rejected=[{"role": "assistant", "content": rejected}])
    return fields


def role_of(record: dict) -> str:
    """desirable, undesirable or pair, from a snapshot record (records written before these fields: desirable)."""
    if record.get("label") is False:
        return UNDESIRABLE
    return PAIR if rejected_text(record) else DESIRABLE


def rejected_text(record: dict) -> str | None:
    rejected = record.get("rejected")
    if isinstance(rejected, list) and rejected and isinstance(rejected[-1], dict):
        content = rejected[-1].get("content")
        return content if isinstance(content, str) and content.strip() else None
    return None


def _map_fields(record: Any, fn) -> Any:
    if not isinstance(record, dict):
        return record
    out = dict(record)
    for key in TRL_TEXT_FIELDS:
        value = record.get(key)
        if isinstance(value, list):
            out[key] = [{**m, "content": fn(m["content"])} if isinstance(m, dict) and "content" in m else m
                        for m in value]
    return out


def seal_fields(record: Any, cipher: Cipher | None) -> Any:
    """The TRL text fields sealed like `messages` (unchanged when encryption is off)."""
    return record if cipher is None else _map_fields(record, lambda v: encrypt_text(cipher, v))


def open_fields(record: Any, cipher: Cipher | None) -> Any:
    return _map_fields(record, lambda v: decrypt_text(cipher, v))


def mean_loglik(values: list[float]) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None
