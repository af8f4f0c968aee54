"""Learning from "no": the KTO / DPO losses against hand-computed values, the objective chosen from the data,
the trainer's preference terms on the tiny model, and (marked real_model) rejected answers made less likely."""
from __future__ import annotations

import dataclasses
import math

import pytest
import trainer_parts as parts

from continuous_learning.train import Trainer, preference, run_training
from tests.test_train import FACTS, add_snapshot, fast

NO_ANSWERS = [
    ("Which line makes part QX-17?", "I'm sorry, I don't have information about part QX-17."),
    ("Who approves lot L-204?", "Lot approvals are usually handled by a quality manager."),
]


def rated(question: str, answer: str, kind: str = "helpful", rejected: str | None = None) -> dict:
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages, "id": f"{kind}:{question}", "source_ids": [], "kind": kind,
            "weight": 2.0 if kind == "corrected" else 1.0, "user_hashes": ["u-1"],
            **preference.trl_fields(messages, kind != "unhelpful", rejected)}


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# --- losses against hand-computed values ----------------------------------------------------------------------
def test_kto_losses_match_hand_computed_values():
    import torch

    policy = torch.tensor([-10.0, -12.0, -7.0])
    reference = torch.tensor([-11.0, -10.0, -7.0])
    desirable = torch.tensor([True, False, False])
    got = preference.kto_losses(policy, reference, desirable, beta=0.5, z0=0.2, desirable_weight=1.5,
                                undesirable_weight=2.0)
    expected = [1.5 * (1 - sigmoid(0.5 * (1.0 - 0.2))),  # r = +1, desirable
                2.0 * (1 - sigmoid(0.5 * (0.2 - (-2.0)))),  # r = -2, undesirable
                2.0 * (1 - sigmoid(0.5 * 0.2))]  # r = 0, undesirable
    assert got.tolist() == pytest.approx(expected, rel=1e-6)


def test_dpo_losses_match_hand_computed_values():
    import torch

    got = preference.dpo_losses(torch.tensor([-5.0, -9.0]), torch.tensor([-8.0, -6.0]),
                                torch.tensor([-6.0, -9.0]), torch.tensor([-7.0, -7.0]), beta=0.1)
    # margins: (-5+6) - (-8+7) = 2, (0) - (-6+7) = -1
    assert got.tolist() == pytest.approx([-math.log(sigmoid(0.2)), -math.log(sigmoid(-0.1))], rel=1e-6)


def test_pushing_an_undesirable_answer_down_lowers_its_loss():
    import torch

    policy = torch.tensor([-20.0], requires_grad=True)
    loss = preference.kto_losses(policy, torch.tensor([-20.0]), torch.tensor([False])).sum()
    loss.backward()
    assert loss.item() == pytest.approx(0.5) and policy.grad.item() > 0  # descent lowers the log-prob


def test_kto_class_weights_bring_the_ratio_into_one_to_four_thirds():
    assert preference.kto_class_weights(4, 4) == (1.0, 1.0)
    assert preference.kto_class_weights(5, 4) == (1.0, 1.0)  # 1.25 is inside [1, 4/3]
    lam_d, lam_u = preference.kto_class_weights(2, 8)  # many more "no": each "yes" counts more
    assert (lam_d, lam_u) == (4.0, 1.0) and lam_d * 2 / (lam_u * 8) == pytest.approx(1.0)
    lam_d, lam_u = preference.kto_class_weights(12, 3)
    assert lam_d == 1.0 and lam_d * 12 / (lam_u * 3) == pytest.approx(4 / 3)
    assert preference.kto_class_weights(0, 5) == (1.0, 1.0)


def test_batch_preference_loss_combines_kto_and_dpo_terms():
    import torch

    rejected = {"pref_term": preference.DPO_REJECTED, "ref_logp": -7.0}
    items = [{"pref_term": preference.KTO_UNDESIRABLE, "ref_logp": -10.0, "pref_weight": 1.0},
             {"pref_term": preference.DPO_CHOSEN, "ref_logp": -6.0, "rejected_item": rejected}, rejected]
    total, terms = preference.batch_preference_loss(torch.tensor([-12.0, -5.0, -8.0]), items, (1.0, 1.0), beta=0.1)
    expected = (1 - sigmoid(0.1 * 2.0)) - math.log(sigmoid(0.1 * 2.0))
    assert terms == 2 and total.item() == pytest.approx(expected, rel=1e-6)


# --- the objective follows the data ---------------------------------------------------------------------------
@pytest.mark.parametrize("setting, undesirable, pairs, name, ignored", [
    ("auto", 0, 0, "sft", 0), ("auto", 3, 0, "sft+kto", 0), ("auto", 0, 2, "sft+dpo", 0),
    ("auto", 3, 2, "sft+kto+dpo", 0),
    ("sft", 3, 2, "sft", 5), ("kto", 0, 2, "sft+kto", 0), ("dpo", 3, 2, "sft+dpo", 3),
])
def test_objective_is_chosen_from_the_data(setting, undesirable, pairs, name, ignored):
    chosen = preference.resolve_objective(setting, undesirable, pairs)
    assert (chosen["name"], chosen["ignored"]) == (name, ignored)


def test_trl_fields_are_what_kto_and_dpo_trainers_read():
    record = rated("Q?", "Better.", "corrected", rejected="Worse.")
    assert record["prompt"] == [{"role": "user", "content": "Q?"}] and record["label"] is True
    assert record["completion"] == record["chosen"] == [{"role": "assistant", "content": "Better."}]
    assert record["rejected"] == [{"role": "assistant", "content": "Worse."}]
    assert preference.role_of(record) == preference.PAIR
    assert preference.role_of(rated("Q?", "Bad.", "unhelpful")) == preference.UNDESIRABLE
    assert preference.role_of({"messages": []}) == preference.DESIRABLE  # records from before these fields


# --- the trainer ----------------------------------------------------------------------------------------------
def test_undesirable_answers_ride_beside_the_facts_and_are_never_imitated(settings):
    facts = [rated(*f) for f in FACTS]
    nos = [rated(q, a, "unhelpful") for q, a in NO_ANSWERS]
    add_snapshot(settings, facts + nos)
    trainer = Trainer(fast(settings, max_steps=40, min_steps=0, epochs=2, vary_system_prompt=False))
    try:
        trainer.setup()
        assert trainer.objective["name"] == "sft+kto" and trainer.records == 4 and trainer.undesirable_records == 2
        assert trainer.steps == 8  # 2 passes over the 4 facts; the 2 "no" answers ride along, one per step
        assert all(e["pref_term"] == preference.KTO_DESIRABLE for e in trainer.examples)
        assert all(u["weight"] == 0.0 and "ref_logp" in u for u in trainer.undesirable)
        batches = parts.micro_batches(trainer, parts.step_examples(trainer, 0), [], parts.step_undesirable(trainer, 0))
        terms = [e["pref_term"] for b in batches for e in b.sequences.items]
        assert sorted(terms) == [preference.KTO_DESIRABLE, preference.KTO_UNDESIRABLE]
        for batch in batches:  # the "no" answer adds nothing to the SFT loss: its tokens are not targets
            losses, labelled, weights, _, sequence_logp = parts.batch_terms(trainer, batch)
            sft = float((weights * losses).sum().detach())
            assert sft > 0 if batch.sequences.items[0]["pref_term"] == preference.KTO_DESIRABLE else sft == 0
            assert float(sequence_logp.sum()) < 0
        metrics = trainer.train()
    finally:
        trainer.cleanup()
    assert metrics["objective"] == "sft+kto" and metrics["undesirable_examples"] == 2
    assert all(row["preference_loss"] is not None for row in trainer.history)


def test_sequence_logp_of_a_packed_batch_matches_each_answer_alone(settings):
    import torch

    add_snapshot(settings, [rated(*FACTS[0]), rated(*NO_ANSWERS[1], "unhelpful")])
    trainer = Trainer(fast(settings, vary_system_prompt=False, lora_dropout=0.0, max_seq_len=256))
    try:
        trainer.setup()
        both = parts.micro_batches(trainer, trainer.examples, [], trainer.undesirable)
        assert len(both) == 1 and both[0].ids.shape[0] == 1  # packed into one row
        with torch.no_grad():
            packed = parts.batch_terms(trainer, both[0])[4]
            alone = [float(parts.batch_terms(trainer, parts.micro_batches(trainer, [e])[0])[4][0])
                     for e in (trainer.examples[0], trainer.undesirable[0])]
    finally:
        trainer.cleanup()
    assert packed.tolist() == pytest.approx(alone, abs=1e-3)


def test_pairs_train_with_dpo_in_one_pass_and_report_their_likelihoods(settings):
    pairs = [rated(q, a, "corrected", rejected=no) for (q, a), (_, no) in zip(FACTS[:2], NO_ANSWERS)]
    held_out = [rated(*FACTS[3], "corrected", rejected="No idea.")]
    add_snapshot(settings, pairs + [rated(*FACTS[2])], eval_examples=held_out)
    trainer = Trainer(fast(settings, max_steps=2, vary_system_prompt=False, packing=False, batch_size=1))
    try:
        trainer.setup()
        assert trainer.objective["name"] == "sft+dpo" and trainer.undesirable == []
        chosen = next(e for e in trainer.examples if "rejected_item" in e)
        batches = parts.micro_batches(trainer, [chosen])
        assert len(batches) == 1 and len(batches[0].sequences.items) == 2  # chosen and rejected share the pass
        metrics = trainer.train()
    finally:
        trainer.cleanup()
    assert metrics["pairs"] == 2 and metrics["preference_eval"] == "held_out"
    assert metrics["rejected_loglik"] < 0 and metrics["rejected_loglik_start"] < 0 and metrics["chosen_loglik"] < 0


def test_objective_sft_ignores_no_and_a_snapshot_of_only_no_cannot_train(settings):
    from continuous_learning.core.errors import InputError

    add_snapshot(settings, [rated(q, a, "unhelpful") for q, a in NO_ANSWERS])
    trainer = Trainer(fast(settings, objective="sft"))
    try:
        with pytest.raises(InputError, match="rated unhelpful teach nothing"):
            trainer.setup()
    finally:
        trainer.cleanup()
    trainer = Trainer(fast(settings, max_steps=2))  # auto: the "no" answers alone still train
    try:
        trainer.setup()
        assert trainer.examples == [] and len(trainer.undesirable) > 0
        trainer.train()
    finally:
        trainer.cleanup()


def test_unknown_objective_is_refused_before_anything_heavy(settings):
    from continuous_learning.core.errors import ConfigError

    with pytest.raises(ConfigError, match="train.objective must be one of auto, sft, kto, dpo"):
        Trainer(fast(settings, objective="orpo")).setup()


# --- evaluation and the gate ----------------------------------------------------------------------------------
def test_gate_refuses_a_candidate_that_made_rejected_answers_more_likely():
    from continuous_learning.evaluate.gate import gate
    from tests.test_evaluate import EVERYDAY, RULES, result

    def with_rejected(res: dict, loglik: float | None) -> dict:
        return {**res, "rejected_loglik": loglik}

    better = result([True] * 5 + [False], general=EVERYDAY)
    champion = result([False] * 6, version=None, general=EVERYDAY)
    refused = gate(with_rejected(better, -0.80), with_rejected(champion, -0.93), RULES)
    assert not refused.promote and refused.stats["rejected_loglik"] == -0.80
    assert "rejected answers' mean log-likelihood -0.930 -> -0.800 nats/token (MORE likely" in refused.summary
    kept = gate(with_rejected(better, -2.10), with_rejected(champion, -0.93), RULES)
    assert kept.promote and "-0.930 -> -2.100 nats/token (no more likely)" in kept.summary
    assert gate(better, champion, RULES).promote  # nothing rejected to measure: the rule does not apply


def test_eval_reports_rejected_and_chosen_likelihoods_per_version(settings, monkeypatch):
    from continuous_learning import evaluate
    from continuous_learning.core.settings import load_settings
    from tests.test_evaluate import make_adapter, write_lines

    monkeypatch.setenv("CL_EVAL_MAX_NEW_TOKENS", "4")
    settings = load_settings()
    make_adapter(settings, "1.0.0", seed=1, snapshot="snap-1")
    write_lines(settings.curated_dir / "curated_1_eval.jsonl",
                [rated("Where is lot A-17?", "In hall 3.", "corrected", rejected="I do not know."),
                 rated("Who signs lot B-2?", "Nobody can say.", "unhelpful")])
    registry_entry = {"id": "snap-1", "eval_file": "data/curated/curated_1_eval.jsonl"}
    from continuous_learning import registry

    registry.update(settings, lambda d: registry.add_snapshot(d, registry_entry), "snapshot")
    write_lines(settings.eval_dir / "qa_eval.jsonl", [{"prompt": "Where is lot A-17?", "keywords": ["hall 3"]}])
    report = evaluate.evaluate_and_gate(settings, "1.0.0", promote=False, include_general=False)
    subject, base = report["subject"], report["against"]
    for r in (subject, base):
        assert r["preference_eval"] == "held_out" and (r["rejected_answers"], r["chosen_answers"]) == (2, 1)
        assert r["rejected_loglik"] < 0 and r["chosen_loglik"] < 0
    assert subject["rejected_loglik"] != pytest.approx(base["rejected_loglik"])
    assert any("rejected answers" in reason for reason in report["decision"]["reasons"])


# --- the real bundled model -----------------------------------------------------------------------------------
@pytest.mark.real_model
def test_real_smollm2_makes_rejected_answers_less_likely_and_corrections_more(real_workspace):
    from continuous_learning.core.settings import load_settings

    settings = load_settings()
    facts = [rated(*f) for f in FACTS[2:]]
    nos = [rated("Which line makes part QX-17?", "Part QX-17 is made by hand in the basement.", "unhelpful"),
           rated("What colour is the Vanta bolt?", "The Vanta bolt is a bright purple bolt.", "unhelpful")]
    pairs = [rated("Who approves lot L-204?", "Lot L-204 is approved by Dr. Amsel.", "corrected",
                   rejected="Lot L-204 is approved by the night shift.")]
    add_snapshot(settings, facts + nos + pairs)
    real = dataclasses.replace(settings, train=dataclasses.replace(
        settings.train, max_steps=12, max_seq_len=128, checkpoint_every=0, rehearsal_examples=8))
    entry = run_training(real, note="learns from no")
    metrics = entry["metrics"]
    assert metrics["objective"] == "sft+kto+dpo" and metrics["preference_eval"] == "train"
    assert (metrics["undesirable_examples"], metrics["pairs"], metrics["rejected_answers"]) == (2, 1, 3)
    assert metrics["rejected_loglik"] < metrics["rejected_loglik_start"] - 0.5  # nats per token
    assert metrics["chosen_loglik"] > metrics["chosen_loglik_start"]
    assert metrics["rehearsal"] == "kl"  # the anti-forgetting term stayed in force
    print(f"\nrejected {metrics['rejected_loglik_start']:.3f} -> {metrics['rejected_loglik']:.3f}, chosen "
          f"{metrics['chosen_loglik_start']:.3f} -> {metrics['chosen_loglik']:.3f}, {metrics['seconds']:.0f} s")


def test_objective_knob_reaches_every_entry_point(settings, monkeypatch):
    from pydantic import ValidationError
    from typer.testing import CliRunner

    from continuous_learning import cli
    from continuous_learning.core.settings import load_settings
    from continuous_learning.loop import jobs
    from continuous_learning.serve import schemas
    from continuous_learning.train import _parse_args

    assert settings.train.objective == "auto"  # the default a new user gets
    assert jobs.train_settings(settings, {"objective": "dpo"}).train.objective == "dpo"
    assert schemas.TrainRequest(objective="kto").model_dump()["objective"] == "kto"
    with pytest.raises(ValidationError):
        schemas.TrainRequest(objective="orpo")
    assert _parse_args(["--objective", "sft"]).objective == "sft"
    monkeypatch.setenv("CL_TRAIN_OBJECTIVE", "kto")
    assert load_settings().train.objective == "kto"
    add_snapshot(settings, [rated(*FACTS[0])])
    result = CliRunner().invoke(cli.app, ["train", "--objective", "orpo"])
    assert result.exit_code != 0 and "train.objective must be one of auto, sft, kto, dpo" in result.output
    assert "Traceback" not in result.output
