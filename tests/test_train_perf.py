"""Fast training: packed rows (no cross-example attention, same loss and gradients as padded batches), length-grouped
batches, real-token accounting, all on the tiny random Llama."""
from __future__ import annotations

import math
import random

import orjson
import pytest

from continuous_learning.train import (
    IGNORE_INDEX,
    MEGA_BATCH,
    Trainer,
    collate_packed,
    collate_padded,
    example_order,
    group_by_length,
    pack_rows,
    run_training,
    shard,
)
from test_train import FACTS, add_snapshot, fast, qa
import trainer_parts as parts

LONG = ("Describe the full start-up procedure of the Kestrel-4 line.",
        "First open valve A, then wait two minutes, check the pressure on gauge 7, start pump Orion, "
        "confirm the torque on the Vanta bolts, and only then release lot L-204 to the line.")


# --- pure pieces ------------------------------------------------------------------------------------------------
def test_pack_rows_fills_rows_without_overflow():
    lengths = [30, 5, 12, 60, 7, 33, 64, 1]
    rows = pack_rows(lengths, capacity=64)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))  # every example exactly once
    assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
    assert len(rows) == math.ceil(sum(lengths) / 64)  # the fewest rows possible here (212 tokens -> 4 rows)
    balanced = pack_rows([10, 9, 8, 7, 6, 5], capacity=64)  # 45 tokens: one row
    assert len(balanced) == 1
    two = pack_rows([40, 30, 20, 10, 10], capacity=64)  # 110 tokens -> rows of 60 + 50, not first-fit's 64 + 46
    assert [sum([40, 30, 20, 10, 10][i] for i in row) for row in two] == [60, 50]
    assert [sum(lengths[i] for i in row) for row in rows] == sorted((sum(lengths[i] for i in row) for row in rows), reverse=True)
    assert pack_rows(lengths, 64) == rows  # deterministic


def test_length_grouping_is_seeded_and_groups_similar_lengths():
    rng = random.Random(1)
    lengths = [rng.choice([10, 12, 200, 11, 9, 250]) for _ in range(256)]
    order = list(range(256))
    rng.shuffle(order)
    grouped = group_by_length(order, lengths, micro=4, seed=7)
    assert sorted(grouped) == sorted(order)
    assert grouped == group_by_length(order, lengths, micro=4, seed=7)
    assert grouped != group_by_length(order, lengths, micro=4, seed=8)
    window = 4 * MEGA_BATCH
    for start in range(0, 256, window):  # grouping stays inside its window: the epoch order is still random
        assert sorted(grouped[start : start + window]) == sorted(order[start : start + window])

    def padding(sequence):
        return sum(max(lengths[i] for i in sequence[k : k + 4]) * 4 - sum(lengths[i] for i in sequence[k : k + 4])
                   for k in range(0, len(sequence), 4))

    assert padding(grouped) < padding(order) / 3
    stream = example_order(256, seed=3, start=0, count=600, lengths=lengths, micro=4)
    assert example_order(256, seed=3, start=300, count=40, lengths=lengths, micro=4) == stream[300:340]  # resumable
    assert sorted(stream[:256]) == list(range(256))


def test_shard_splits_a_step_between_processes():
    items = list(range(7))
    parts = [shard(items, r, 3) for r in range(3)]
    assert parts == [[0, 1, 2], [3, 4], [5, 6]]
    assert shard(items, 0, 1) == items


def test_collate_packed_restarts_positions_and_isolates_examples():
    a = {"input_ids": [1, 2, 3], "labels": [IGNORE_INDEX, 2, 3], "weight": 1.0}
    b = {"input_ids": [4, 5], "labels": [5, 5], "weight": 0.5}  # a label on a first token must not leak across
    c = {"input_ids": [6], "labels": [IGNORE_INDEX], "weight": 1.0}
    batch = collate_packed([[a, b], [c]], pad_id=0)
    assert batch.ids.tolist() == [[1, 2, 3, 4, 5], [6, 0, 0, 0, 0]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1], [0, 0, 0, 0, 0]]
    assert batch.labels.tolist()[0] == [IGNORE_INDEX, 2, 3, IGNORE_INDEX, 5]
    assert batch.token_weights.tolist()[0] == [1.0, 1.0, 1.0, 0.5, 0.5]
    mask = batch.mask[0, 0].int().tolist()
    assert mask[3] == [0, 0, 0, 1, 0] and mask[4] == [0, 0, 0, 1, 1] and mask[2] == [1, 1, 1, 0, 0]
    assert all(batch.mask[1, 0, k, k] for k in range(5))  # pad positions see themselves (no empty softmax row)
    assert (batch.real_tokens, batch.padded_tokens) == (6, 4)
    padded = collate_padded([a, b, c], pad_id=0)
    assert (padded.real_tokens, padded.padded_tokens) == (6, 3)


# --- on the tiny model ------------------------------------------------------------------------------------------
@pytest.fixture
def trainer(settings):
    examples = [qa(*FACTS[0]), qa(*LONG, weight=0.5), qa(*FACTS[1]), qa(*FACTS[2], weight=0.5)]
    add_snapshot(settings, examples)
    trainer = Trainer(fast(settings, max_seq_len=512, lora_dropout=0.0, batch_size=4))
    trainer.setup()
    yield trainer
    trainer.cleanup()


def _logits(trainer, batch):
    import torch

    with torch.no_grad():
        kwargs = {"position_ids": batch.position_ids} if batch.position_ids is not None else {}
        return trainer.model(input_ids=batch.ids, attention_mask=batch.mask, use_cache=False, **kwargs).logits


def test_packed_logits_equal_unpacked_logits(trainer):
    examples = trainer.examples
    packed = _logits(trainer, collate_packed([examples], trainer.pad_id))[0]
    at = 0
    for example in examples:
        n = len(example["input_ids"])
        alone = _logits(trainer, collate_padded([example], trainer.pad_id))[0]
        assert (packed[at : at + n] - alone).abs().max() < 1e-4
        at += n


def test_no_attention_crosses_examples_in_a_packed_row(trainer):
    first, second = trainer.examples[0], trainer.examples[2]
    changed = {**first, "input_ids": [t + 1 for t in first["input_ids"]]}
    n = len(first["input_ids"])
    before = _logits(trainer, collate_packed([[first, second]], trainer.pad_id))[0, n:]
    after = _logits(trainer, collate_packed([[changed, second]], trainer.pad_id))[0, n:]
    assert (before - after).abs().max() < 1e-5
    assert (_logits(trainer, collate_packed([[changed]], trainer.pad_id))[0]
            - _logits(trainer, collate_packed([[first]], trainer.pad_id))[0]).abs().max() > 1e-3  # it did change


def _objective_and_grads(trainer, batches, label_tokens):
    trainer.model.zero_grad(set_to_none=True)
    total = 0.0
    for batch in batches:
        losses, labelled, weights, _ = parts.batch_losses(trainer, batch)
        objective = (weights * losses * labelled).sum() / label_tokens
        objective.backward()
        total += float(objective.detach())
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    trainer.model.zero_grad(set_to_none=True)
    return total, grads


def test_packed_weighted_loss_and_gradients_equal_padded_ones(trainer):
    examples = trainer.examples
    assert sorted({e["weight"] for e in examples}) == [0.5, 1.0]
    label_tokens = sum(1 for e in examples for t in e["labels"] if t != IGNORE_INDEX)
    pad = trainer.pad_id
    padded_loss, padded_grads = _objective_and_grads(trainer, [collate_padded(examples, pad)], label_tokens)
    one_by_one, _ = _objective_and_grads(trainer, [collate_padded([e], pad) for e in examples], label_tokens)
    rows = [[examples[i] for i in row] for row in pack_rows([len(e["input_ids"]) for e in examples], 512)]
    packed_loss, packed_grads = _objective_and_grads(trainer, [collate_packed(rows, pad)], label_tokens)
    assert len(rows) < len(examples)  # something really was packed together
    assert packed_loss == pytest.approx(padded_loss, rel=1e-5) and one_by_one == pytest.approx(padded_loss, rel=1e-5)
    assert padded_grads.keys() == packed_grads.keys() and padded_grads
    for name, grad in padded_grads.items():
        assert (packed_grads[name] - grad).abs().max() <= 1e-4 * max(1e-6, float(grad.abs().max())) + 1e-7, name


def test_packed_and_padded_runs_follow_the_same_loss_curve(settings):
    add_snapshot(settings, [qa(*f) for f in FACTS] + [qa(*LONG, weight=0.5)])
    curves, padding = {}, {}
    for packing in (True, False):
        trainer = Trainer(fast(settings, max_steps=3, batch_size=2, grad_accum=2, max_seq_len=256, lora_dropout=0.0,
                               packing=packing, group_by_length=False))
        try:
            trainer.setup()
            trainer.train()
        finally:
            trainer.cleanup()
        rows = [orjson.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_bytes().splitlines()]
        curves[packing] = [r["loss"] for r in rows]
        padding[packing] = sum(r["padded_tokens"] for r in rows)
        assert all(r["tokens"] == r["real_tokens"] for r in rows)
        assert trainer.metrics["real_tokens"] == sum(r["real_tokens"] for r in rows)
    assert curves[True] == pytest.approx(curves[False], rel=2e-4)
    assert padding[True] < padding[False]


def test_training_with_packing_learns_and_registers(settings):
    add_snapshot(settings, [qa(*f) for f in FACTS] + [qa(*LONG)])
    entry = run_training(fast(settings, max_steps=20, batch_size=5, learning_rate=2e-3, lora_dropout=0.0,
                              max_seq_len=256, warmup_ratio=0.0))
    metrics = entry["metrics"]
    assert metrics["packing"] is True and metrics["processes"] == 1
    assert metrics["final_loss"] < metrics["initial_loss"] - 0.25  # the random tiny model learns (slowly) its answers
    assert metrics["real_tokens"] == metrics["train_tokens"] > 0 and metrics["padded_tokens"] >= 0
    assert (settings.home / entry["path"] / "adapter_model.safetensors").exists()


def test_length_grouped_padded_batches_waste_less_and_still_train(settings):
    import dataclasses

    add_snapshot(settings, [qa(*f) for f in FACTS] + [qa(*LONG), qa(LONG[0] + " Again?", LONG[1])])
    trainer = Trainer(fast(settings, packing=False, group_by_length=True, batch_size=2, max_steps=3, max_seq_len=256))
    try:
        trainer.setup()

        def pad_waste(steps: int) -> int:
            return sum(b.padded_tokens for s in range(steps) for b in parts.micro_batches(trainer, parts.step_examples(trainer, s)))

        grouped = [[e["id"] for e in parts.step_examples(trainer, s)] for s in range(6)]
        assert grouped == [[e["id"] for e in parts.step_examples(trainer, s)] for s in range(6)]  # seeded: the same again
        assert sorted(i for step in grouped[:3] for i in step) == sorted(e["id"] for e in trainer.examples)
        grouped_waste = pad_waste(3)
        trainer.cfg = dataclasses.replace(trainer.cfg, group_by_length=False)
        assert grouped_waste < pad_waste(3)
        trainer.cfg = dataclasses.replace(trainer.cfg, group_by_length=True)
        metrics = trainer.train()
    finally:
        trainer.cleanup()
    assert metrics["steps"] == 3 and metrics["packing"] is False and math.isfinite(metrics["final_loss"])
    assert metrics["padded_tokens"] == grouped_waste
