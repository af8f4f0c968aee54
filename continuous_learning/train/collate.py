"""Collation: examples into the tensors of one forward pass (padded rows, or packed rows with a block-diagonal
mask), with the rehearsal KL targets and the preference answers of the pass. torch is imported inside functions."""
from __future__ import annotations

import dataclasses
from typing import Any

from ..core.settings import TrainConfig
from . import preference
from .encode import IGNORE_INDEX
from .plan import pack_rows


@dataclasses.dataclass
class Batch:
    """One forward pass: ids/labels (rows, L); `mask` is the usual 2D padding mask, or for packed rows a 4D
    (rows, 1, L, L) block-diagonal causal mask (with sdpa, restarting position ids alone leak attention across
    examples); `token_weights` carries each example's loss weight on its own positions."""

    ids: Any
    mask: Any
    labels: Any
    token_weights: Any
    position_ids: Any = None
    real_tokens: int = 0
    padded_tokens: int = 0  # pad positions computed on (the waste)
    reference: Any = None  # rehearsal targets: KlTargets, or None
    sequences: Any = None  # answers whose summed log-prob a preference term needs: SequenceTargets, or None


@dataclasses.dataclass
class KlTargets:
    """The frozen base's next-token distributions for the rehearsal examples of a batch: at flat position
    `at[i]` (row * L + position of the predicted token) the base's top-k token ids and log-probabilities."""

    at: Any
    ids: Any
    logp: Any


def _reference_targets(placed: list[tuple[int, int, dict]], length: int, device) -> KlTargets | None:
    """KlTargets of the rehearsal examples among `placed` (row, offset, example)."""
    import torch

    at, ids, logp = [], [], []
    for row, offset, example in placed:
        if "ref_ids" not in example:
            continue
        positions = [offset + j for j, t in enumerate(example["labels"]) if t != IGNORE_INDEX]
        at.append(torch.tensor([row * length + p for p in positions], dtype=torch.long))
        ids.append(example["ref_ids"])
        logp.append(example["ref_logp"])
    if not at:
        return None
    return KlTargets(torch.cat(at).to(device), torch.cat(ids).to(device), torch.cat(logp).float().to(device))


@dataclasses.dataclass
class SequenceTargets:
    """The answers of a batch that a preference term scores: flat positions `at` of their labelled tokens,
    `seq[i]` the answer each position belongs to, `sft` whether that position is also an SFT target, and
    `items` the examples themselves (in answer order) with their term and reference log-prob."""

    at: Any
    seq: Any
    sft: Any
    items: list


def _sequence_targets(placed: list[tuple[int, int, dict]], length: int, device) -> SequenceTargets | None:
    import torch

    at, seq, sft, items = [], [], [], []
    for row, offset, example in placed:
        if "pref_term" not in example:
            continue
        positions = [offset + j for j, t in enumerate(example["labels"]) if t != IGNORE_INDEX and j > 0]
        at.append(torch.tensor([row * length + p for p in positions], dtype=torch.long))
        seq.append(torch.full((len(positions),), len(items), dtype=torch.long))
        sft.append(torch.full((len(positions),), example["pref_term"] in preference.SFT_TERMS, dtype=torch.bool))
        items.append(example)
    if not items:
        return None
    return SequenceTargets(torch.cat(at).to(device), torch.cat(seq).to(device), torch.cat(sft).to(device), items)


def collate_padded(batch: list[dict], pad_id: int, device=None) -> Batch:
    """Rows padded on the right to the longest example of the batch."""
    import torch

    length = max(len(e["input_ids"]) for e in batch)
    ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), length), dtype=torch.long)
    for row, example in enumerate(batch):
        n = len(example["input_ids"])
        ids[row, :n] = torch.tensor(example["input_ids"])
        labels[row, :n] = torch.tensor(example["labels"])
        mask[row, :n] = 1
    weights = torch.tensor([0.0 if "ref_ids" in e else e["weight"] for e in batch], dtype=torch.float32)
    real = int(mask.sum())
    placed = [(row, 0, e) for row, e in enumerate(batch)]
    return Batch(ids.to(device), mask.to(device), labels.to(device), weights[:, None].expand(-1, length).to(device),
                 real_tokens=real, padded_tokens=ids.numel() - real,
                 reference=_reference_targets(placed, length, device),
                 sequences=_sequence_targets(placed, length, device))


def collate_packed(rows: list[list[dict]], pad_id: int, device=None) -> Batch:
    """Several examples per row, back to back: position ids restart at 0 for each example, the 4D mask lets a token
    see only earlier tokens of its own example, labels stay -100 on every example's first token, so no loss or
    attention crosses a boundary. Pad positions (shorter rows) attend only to themselves."""
    import torch

    length = max(sum(len(e["input_ids"]) for e in row) for row in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(rows), length), dtype=torch.long)
    segments = torch.full((len(rows), length), -1, dtype=torch.long)
    weights = torch.zeros((len(rows), length), dtype=torch.float32)
    placed = []
    for r, row in enumerate(rows):
        at = 0
        for k, example in enumerate(row):
            n = len(example["input_ids"])
            ids[r, at : at + n] = torch.tensor(example["input_ids"])
            labels[r, at : at + n] = torch.tensor(example["labels"])
            labels[r, at] = IGNORE_INDEX
            positions[r, at : at + n] = torch.arange(n)
            segments[r, at : at + n] = k
            weights[r, at : at + n] = 0.0 if "ref_ids" in example else example["weight"]
            placed.append((r, at, example))
            at += n
    real = int((segments >= 0).sum())
    pads = segments < 0
    segments[pads] = -1 - torch.arange(length).expand(len(rows), -1)[pads]  # each pad position its own segment
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    mask = (segments[:, :, None] == segments[:, None, :]) & causal
    return Batch(ids.to(device), mask[:, None].to(device), labels.to(device), weights.to(device), positions.to(device),
                 real_tokens=real, padded_tokens=ids.numel() - real,
                 reference=_reference_targets(placed, length, device),
                 sequences=_sequence_targets(placed, length, device))


def loss_positions(labels):
    """Positions whose logits predict a labelled token in some row (p predicts p+1): the only logits worth computing.
    The lm_head over a 49k vocabulary is a fifth of SmolLM2's forward; prompts need none of it."""
    needed = (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().flatten()
    return needed if len(needed) else labels.new_zeros(1)



def micro_batches(cfg: TrainConfig, examples: list[dict], rehearsal: list[dict], undesirable: list[dict],
                  pad_id: int, device) -> list[Batch]:
    """One process's forward passes for its share of a step: packed rows (`batch_size` rows each) or padded
    micro-batches of `batch_size` examples. Rehearsal and undesirable examples ride along in the same passes;
    a pair's rejected answer always shares its chosen answer's pass (DPO compares the two)."""
    units = [[e, e["rejected_item"]] if "rejected_item" in e else [e]
             for e in [*examples, *undesirable, *rehearsal]]
    if cfg.packing:
        lengths = [sum(len(e["input_ids"]) for e in unit) for unit in units]
        rows = [[e for i in row for e in units[i]] for row in pack_rows(lengths, cfg.max_seq_len)]
        chunks = [rows[k : k + cfg.batch_size] for k in range(0, len(rows), cfg.batch_size)]
        # rows of one example each need no block mask: the plain causal path is the same and cheaper
        return [collate_packed(chunk, pad_id, device) if any(len(row) > 1 for row in chunk)
                else collate_padded([row[0] for row in chunk], pad_id, device) for chunk in chunks]
    chunks: list[list[dict]] = [[]]
    for unit in units:
        if chunks[-1] and len(chunks[-1]) + len(unit) > cfg.batch_size:
            chunks.append([])
        chunks[-1].extend(unit)
    return [collate_padded(chunk, pad_id, device) for chunk in chunks if chunk]
