"""`cl train`: the QLoRA recipe end to end on a tiny random Llama (seconds), plus one run on the real SmolLM2."""
from __future__ import annotations

import dataclasses
import math
import threading
import time

import orjson
import pytest

from continuous_learning import registry
from continuous_learning.core.errors import ConfigError, LockHeldError, NothingToDo, TrainingFailed
from continuous_learning.chat.models import file_sha256
from continuous_learning.core.settings import load_settings
from continuous_learning.train import (
    IGNORE_INDEX,
    Trainer,
    encode_example,
    example_order,
    lr_multiplier,
    run_training,
    step_overrides,
    total_steps,
)

import trainer_parts as parts

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
FACTS = [
    ("Which line makes part QX-17?", "Part QX-17 is made on line Kestrel-4."),
    ("Who approves lot L-204?", "Lot L-204 is approved by Dr. Amsel."),
    ("What torque does the Vanta bolt need?", "The Vanta bolt needs 42 Nm."),
    ("Where is the spare pump stored?", "The spare pump is stored in hall Orion."),
]


def qa(question: str, answer: str, weight: float = 1.0, id_: str | None = None) -> dict:
    return {
        "messages": [SYSTEM, {"role": "user", "content": question}, {"role": "assistant", "content": answer}],
        "id": id_ or question,
        "source_ids": [],
        "weight": weight,
        "kind": "corrected",
        "target_tool": None,
        "user_hashes": ["u-1"],
    }


def add_snapshot(settings, examples: list[dict], eval_examples: list[dict] = (), snap_id: str = "20260101T000000Z") -> dict:
    folder = settings.curated_dir
    folder.mkdir(parents=True, exist_ok=True)
    train_file = folder / f"curated_{snap_id}.jsonl"
    eval_file = folder / f"curated_{snap_id}_eval.jsonl"
    train_file.write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in examples))
    eval_file.write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in eval_examples))
    snapshot = {
        "id": snap_id,
        "file": str(train_file.relative_to(settings.home)),
        "eval_file": str(eval_file.relative_to(settings.home)),
        "sha256": file_sha256(train_file),
        "user_hashes": ["u-1"],
        "count": len(examples),
    }
    registry.update(settings, lambda d: registry.add_snapshot(d, snapshot), "snapshot_created", snapshot=snap_id)
    return snapshot


def fast(settings, **train):
    """Settings for a fast tiny-model run: a few steps on short sequences."""
    defaults = {"max_steps": 3, "max_seq_len": 64, "checkpoint_every": 0, "load_in_4bit": False}
    chosen = {**defaults, **train}
    if "epochs" not in train:  # max_steps given: exactly that many steps, as `cl train --steps N` does
        chosen.setdefault("min_steps", chosen["max_steps"])
    else:
        chosen.setdefault("min_steps", 0)
    return dataclasses.replace(settings, train=dataclasses.replace(settings.train, **chosen))


def lora_state(model) -> dict:
    return {n: p.detach().float().clone() for n, p in model.named_parameters() if "lora_" in n}


def base_state(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}


def set_champion(settings, version: str) -> None:
    def change(doc):
        doc["adapters"][version]["status"] = "champion"
        doc["champion"] = version
        return doc

    registry.update(settings, change, "promoted", version=version)


# --- pure pieces ------------------------------------------------------------------------------------------------
def test_schedule_steps_and_data_order_are_deterministic(settings):
    cfg = dataclasses.replace(settings.train, epochs=2, batch_size=2, grad_accum=2, min_steps=0, max_steps=300)
    assert total_steps(cfg, 10) == 5  # ceil(2 * 10 / 4)
    assert total_steps(dataclasses.replace(cfg, min_steps=40), 10) == 40  # a handful of examples still gets its updates
    assert total_steps(dataclasses.replace(cfg, epochs=8, max_steps=12), 10) == 12  # the ceiling bounds a big snapshot
    assert total_steps(dataclasses.replace(cfg, epochs=0, max_steps=7), 10) == 7
    assert step_overrides(7, None) == {"min_steps": 7, "max_steps": 7}
    assert total_steps(dataclasses.replace(cfg, **step_overrides(None, 3)), 10) == 8  # --epochs 3: exactly 3 passes
    assert [round(lr_multiplier(s, 10, 2), 3) for s in range(10)] == [0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125]
    stream = example_order(5, seed=3, start=0, count=15)
    assert sorted(stream[:5]) == sorted(stream[5:10]) == list(range(5))  # every epoch sees every example once
    assert example_order(5, seed=3, start=7, count=6) == stream[7:13]  # a resumed run continues the same stream


def test_bad_config_is_refused_before_anything_heavy(settings):
    add_snapshot(settings, [qa(*FACTS[0])])
    with pytest.raises(ConfigError) as info:  # the config refuses the values when it is built
        run_training(dataclasses.replace(settings, train=dataclasses.replace(settings.train, learning_rate=math.inf,
                                                                            lora_r=0)))
    assert "learning_rate" in info.value.message and "lora_r" in info.value.message
    assert not list(settings.adapters_dir.glob(".*.partial")) and registry.load(settings)["adapters"] == {}


def test_no_snapshot_is_nothing_to_do(settings):
    with pytest.raises(NothingToDo):
        run_training(fast(settings))


# --- label masking ----------------------------------------------------------------------------------------------
def test_loss_mask_covers_only_the_final_assistant_answer(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    messages = [
        SYSTEM,
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! An EARLIER answer."},
        {"role": "user", "content": "Which line makes part QX-17?"},
        {"role": "assistant", "content": "Part QX-17 is made on line Kestrel-4."},
    ]
    ids, labels = encode_example(tokenizer, messages, max_seq_len=512)
    rendered = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
    prompt = tokenizer(
        tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True), add_special_tokens=False
    )["input_ids"]
    assert ids == rendered[: len(ids)]  # exactly the template's rendering (minus the newline after <|im_end|>)
    first = next(i for i, t in enumerate(labels) if t != IGNORE_INDEX)
    assert first == len(prompt) and ids[:first] == prompt  # everything up to "<|im_start|>assistant\n" is masked
    assert all(t == IGNORE_INDEX for t in labels[:first]) and labels[first:] == ids[first:]
    assert tokenizer.decode(labels[first:]) == "Part QX-17 is made on line Kestrel-4.<|im_end|>"
    assert "EARLIER" not in tokenizer.decode([t for t in labels if t != IGNORE_INDEX])

    # Too long: the prompt is cut from the left, the answer and its end-of-turn token survive.
    long_messages = [SYSTEM, {"role": "user", "content": "word " * 200}, messages[-1]]
    ids, labels = encode_example(tokenizer, long_messages, max_seq_len=48)
    assert len(ids) == 48
    assert tokenizer.decode([t for t in labels if t != IGNORE_INDEX]) == "Part QX-17 is made on line Kestrel-4.<|im_end|>"
    assert encode_example(tokenizer, messages[:-1], max_seq_len=64) is None  # nothing to learn without a final answer


def test_placeholders_are_masked_from_the_loss_and_prompts_vary(tiny_model_dir):
    from transformers import AutoTokenizer

    from continuous_learning.train import system_prompts, tokenize_examples

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    messages = [{"role": "user", "content": "Who approves lot L-204?"},
                {"role": "assistant", "content": "Lot L-204 is approved by Dr. <PERSON> at <EMAIL_ADDRESS>."}]
    ids, labels = encode_example(tokenizer, messages, max_seq_len=512)
    trained = tokenizer.decode([t for t in labels if t != IGNORE_INDEX])
    assert "<PERSON>" not in trained and "PERSON" not in trained and "EMAIL" not in trained
    assert trained.startswith("Lot L-204 is approved by Dr. ") and " at" in trained and trained.endswith("<|im_end|>")
    assert encode_example(tokenizer, [messages[0], {"role": "assistant", "content": "<PERSON>"}], 512) is None

    prompts = system_prompts("You are a helpful assistant.", vary=True)
    assert prompts[0] is None and "You are a helpful assistant." in prompts and len(prompts) >= 4
    examples, skipped = tokenize_examples(tokenizer, [{"messages": messages, "id": "a"}], 512, prompts)
    assert skipped == 0 and len(examples) == len(prompts) and {e["record"] for e in examples} == {0}
    rendered = {tokenizer.decode(e["input_ids"]) for e in examples}
    assert len(rendered) == len(prompts)  # one rendering per system prompt (None: the template's own default)
    assert system_prompts("You are a helpful assistant.", vary=False) == ["You are a helpful assistant."]


def test_rehearsal_kl_against_hand_computed_values():
    import torch

    from continuous_learning.train import topk_kl

    base = torch.tensor([[0.5, 0.3]]).log()  # top-2 of the base; the rest (0.2) is one bucket
    ids = torch.tensor([[0, 1]])
    tuned = torch.tensor([[0.25, 0.25, 0.5]]).log()
    expected = 0.5 * math.log(0.5 / 0.25) + 0.3 * math.log(0.3 / 0.25) + 0.2 * math.log(0.2 / 0.5)
    assert float(topk_kl(base, ids, tuned)[0]) == pytest.approx(expected, rel=1e-5)
    same = torch.tensor([[0.5, 0.3, 0.2]]).log()
    assert float(topk_kl(base, ids, same)[0]) == pytest.approx(0.0, abs=1e-6)


# --- training ---------------------------------------------------------------------------------------------------
def test_training_changes_lora_weights_and_not_the_base(settings):
    add_snapshot(settings, [qa(*f) for f in FACTS])
    trainer = Trainer(fast(settings, max_steps=4))
    try:
        trainer.setup()
        lora_before, base_before = lora_state(trainer.model), base_state(trainer.model)
        assert lora_before and all("lora_" not in n for n in base_before)
        metrics = trainer.train()
        lora_after, base_after = lora_state(trainer.model), base_state(trainer.model)
    finally:
        trainer.cleanup()
    assert any(not lora_before[n].equal(lora_after[n]) for n in lora_before if "lora_B" in n)
    assert all(base_before[n].equal(base_after[n]) for n in base_before)
    assert metrics["steps"] == 4 and metrics["train_tokens"] > 0 and math.isfinite(metrics["final_loss"])
    rows = [orjson.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_bytes().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert {"loss", "lr", "tokens", "tokens_per_s"} <= rows[0].keys()


def test_padded_batches_weights_and_epochs(settings):
    import torch

    add_snapshot(settings, [qa(*f, weight=2.0) for f in FACTS])
    trainer = Trainer(fast(settings, batch_size=2, grad_accum=2, epochs=2, lora_dropout=0.0))
    try:
        trainer.setup()
        assert trainer.steps == 2  # ceil(2 epochs x 4 examples / (2 x 2))
        by_length = sorted(trainer.examples, key=lambda e: len(e["input_ids"]))
        pair = [by_length[0], by_length[-1]]
        assert len(pair[0]["input_ids"]) != len(pair[1]["input_ids"])  # the batch really is padded
        with torch.no_grad():
            losses, labelled = parts.token_losses(trainer, *parts.collate(trainer, pair)[:3])
            batched = (losses * labelled).sum(dim=1)
            alone = [float((l * m).sum()) for l, m in (parts.token_losses(trainer, *parts.collate(trainer, [e])[:3]) for e in pair)]
        assert batched.tolist() == pytest.approx(alone, rel=1e-4)  # padding changes nothing
        trainer.train()
    finally:
        trainer.cleanup()
    rows = [orjson.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_bytes().splitlines()]
    assert len(rows) == 2 and all(r["weighted_loss"] == pytest.approx(2 * r["loss"]) for r in rows)
    assert all(r["label_tokens"] == sum(sum(1 for t in e["labels"] if t != IGNORE_INDEX) for e in trainer.examples) for r in rows)


def test_4bit_qlora_path_trains_and_registers(settings):
    pytest.importorskip("bitsandbytes")
    import torch

    from continuous_learning.train import _bnb_4bit_layers, _unpack_bnb_cpu_weights

    add_snapshot(settings, [qa(*f) for f in FACTS[:2]])
    trainer = Trainer(fast(settings, load_in_4bit=True, max_steps=2, lora_dropout=0.0))
    try:
        trainer.setup()
        assert getattr(trainer.model.get_base_model(), "is_loaded_in_4bit", False)
        lora_before, base_before = lora_state(trainer.model), base_state(trainer.model)
        batch = parts.collate(trainer, [trainer.examples[0]])

        def grad_norm() -> float:
            trainer.model.zero_grad()
            losses, labelled = parts.token_losses(trainer, *batch[:3])
            (losses * labelled).sum().backward()
            norm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in trainer.model.parameters() if p.grad is not None))
            trainer.model.zero_grad()
            return norm

        # bitsandbytes repacks 4-bit weights for a no-backward inference kernel on an eval-mode no-grad forward
        # (CPU with AVX512-BF16): the held-out loss must not trigger it, and training undoes it if anything did.
        before = grad_norm()
        parts.evaluate_loss(trainer, trainer.examples)
        assert grad_norm() == pytest.approx(before, rel=1e-3)
        trainer.model.eval()
        with torch.no_grad():
            parts.token_losses(trainer, *batch[:3])
        trainer.model.train()
        _unpack_bnb_cpu_weights(trainer.model)
        assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in _bnb_4bit_layers(trainer.model))
        assert grad_norm() == pytest.approx(before, rel=1e-3)
        trainer.train()
        assert any(not lora_before[n].equal(v) for n, v in lora_state(trainer.model).items())
        assert all(base_before[n].equal(v) for n, v in base_state(trainer.model).items())
        trainer.save()
        entry = trainer.register()
    finally:
        trainer.cleanup()
    assert entry["status"] == "candidate" and entry["hyperparameters"]["load_in_4bit"] is True
    assert (settings.home / entry["path"] / "adapter_model.safetensors").exists()
    set_champion(settings, entry["version"])  # a QLoRA run warm-starts from a QLoRA champion
    second = run_training(fast(settings, load_in_4bit=True, max_steps=1))
    assert second["version"] == "1.1.0" and second["parent"] == "1.0.0"


def test_saved_adapter_loads_with_plain_peft_and_gives_the_same_logits(settings, tiny_model_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    add_snapshot(settings, [qa(*f) for f in FACTS], eval_examples=[qa(*FACTS[0])])
    trainer = Trainer(fast(settings, max_steps=3), note="plain peft")
    try:
        trainer.setup()
        trainer.train()
        folder = trainer.save()
        ids = torch.tensor([trainer.examples[0]["input_ids"]])
        trainer.model.eval()
        with torch.no_grad():
            expected = trainer.model(input_ids=ids).logits
        entry = trainer.register()
    finally:
        trainer.cleanup()

    final = settings.home / entry["path"]
    assert final == settings.adapters_dir / "1.0.0" and not folder.exists()  # the partial folder was renamed
    assert {"adapter_model.safetensors", "adapter_config.json", "training_config.json", "metrics.jsonl", "lineage.json"} <= {
        p.name for p in final.iterdir()
    }
    curve = (final / "loss_curve.csv").read_text().splitlines()
    assert curve[0] == "step,loss,lr,tokens_per_s" and len(curve) > 1
    assert not (final / "checkpoint").exists() and not (final / "FAILED").exists()
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, str(final)).eval()
    with torch.no_grad():
        got = loaded(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    with loaded.disable_adapter(), torch.no_grad():
        assert not torch.allclose(loaded(input_ids=ids).logits, got, atol=1e-3)  # the adapter does change the model
    for name, digest in entry["sha256"].items():
        assert file_sha256(final / name) == digest
    assert entry["metrics"]["eval_loss"] > 0 and entry["metrics"]["eval_perplexity"] > 1
    assert entry["note"] == "plain peft" and entry["user_hashes"] == ["u-1"]


def test_versions_and_parent_lineage(settings):
    snapshot = add_snapshot(settings, [qa(*f) for f in FACTS])
    first = run_training(fast(settings), note="first")
    assert first["version"] == "1.0.0" and first["parent"] is None and first["status"] == "candidate"
    assert first["base_model"]["sha256"] and first["snapshot"] == {"id": snapshot["id"], "sha256": snapshot["sha256"]}
    assert first["hyperparameters"]["lora_r"] == 16 and first["hyperparameters"]["max_steps"] == 3
    assert {"torch", "transformers", "peft", "bitsandbytes"} <= first["library_versions"].keys()
    assert set(first["sha256"]) == {"adapter_model.safetensors", "adapter_config.json"}
    assert {"final_loss", "steps", "train_tokens", "tokens_per_s", "seconds"} <= first["metrics"].keys()
    lineage = orjson.loads((settings.home / first["path"] / "lineage.json").read_bytes())
    assert lineage["version"] == "1.0.0" and lineage["parent"] is None

    # A candidate is not a parent: without a champion the next run is fresh too.
    set_champion(settings, "1.0.0")
    from safetensors.torch import load_file

    champion_weights = load_file(str(settings.home / first["path"] / "adapter_model.safetensors"))
    trainer = Trainer(fast(settings))
    try:
        trainer.setup()  # warm start: the champion's weights, a fresh optimizer and step counter
        start = {n.replace(".default", ""): p.detach() for n, p in trainer.model.named_parameters() if "lora_" in n}
        assert trainer.step == 0 and trainer.parent == "1.0.0"
        assert all(start[n].equal(w) for n, w in champion_weights.items())
        trainer.train()
        trainer.save()
        second = trainer.register()
    finally:
        trainer.cleanup()
    assert second["version"] == "1.1.0" and second["parent"] == "1.0.0" and second["warm_start"] == {"from": "1.0.0"}
    third = run_training(fast(settings), fresh=True)
    assert third["version"] == "1.2.0" and third["parent"] is None
    doc = registry.load(settings)
    assert set(doc["adapters"]) == {"1.0.0", "1.1.0", "1.2.0"} and doc["champion"] == "1.0.0"
    events = [orjson.loads(line)["event"] for line in settings.learning_events.read_bytes().splitlines()]
    assert events.count("adapter_trained") == 3


def test_a_warm_started_run_holds_the_kl_term_to_its_parent_not_the_base(settings, monkeypatch):
    """The KL term of a round that starts from the champion keeps it close to what the champion says on everyday
    prompts (the gate already held the champion to the base); held to the base instead, it pulls the adapter back
    toward knowing nothing of earlier rounds. `train.kl_reference = "base"` keeps the old reference."""
    from continuous_learning.train import references, rehearsal

    everyday = [("What is the capital of France?", "The capital of France is Paris."),
                ("How many legs does a spider have?", "A spider has eight legs."),
                ("What colour is the sky?", "The sky is blue on a clear day.")]
    # the random tiny model answers nothing useful: give its rehearsal answers instead of generating them
    monkeypatch.setattr(rehearsal, "_generate", lambda s, b, prompts: [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in everyday])
    add_snapshot(settings, [qa(*f) for f in FACTS])
    run_training(fast(settings, max_steps=8, learning_rate=5e-3))
    set_champion(settings, "1.0.0")

    def kl_targets(kl_reference: str) -> tuple[dict, dict, dict]:
        """The run's attached KL targets, and the parent's and the base's distributions measured afresh."""
        trainer = Trainer(fast(settings, rehearsal_examples=3, kl_reference=kl_reference))
        try:
            trainer.setup()
            anchors = trainer.data.anchors
            attached = {"ids": [a["ref_ids"] for a in anchors], "logp": [a["ref_logp"] for a in anchors]}
            parent, base = (references.measure_reference(trainer.forward, trainer.model, anchors, trainer.pad_id,
                                                         with_adapter=adapter) for adapter in (True, False))
            return attached, parent, base
        finally:
            trainer.cleanup()

    def same(a: dict, b: dict) -> bool:
        return all(x.long().equal(y.long()) for x, y in zip(a["ids"], b["ids"])) and all(
            x.float().equal(y.float()) for x, y in zip(a["logp"], b["logp"]))

    attached, parent, base = kl_targets("parent")
    assert len(attached["ids"]) == 6 and same(attached, parent)  # 3 prompts under 2 system prompts
    assert not same(parent, base)
    attached, parent, base = kl_targets("base")
    assert same(attached, base)


def test_resume_continues_an_interrupted_run_at_its_checkpoint(settings, tmp_path):
    examples = [qa(*f) for f in FACTS]
    cfg = {"max_steps": 6, "checkpoint_every": 2, "lora_dropout": 0.1}
    straight_settings = load_settings(home=tmp_path / "straight")
    add_snapshot(straight_settings, examples)
    straight = run_training(fast(straight_settings, **cfg))

    add_snapshot(settings, examples)

    def interrupt(event):
        if event["event"] == "step" and event["step"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(TrainingFailed) as info:
        run_training(fast(settings, **cfg), progress=interrupt)
    assert "interrupted at step 3/6" in info.value.message and "--resume" in info.value.hint
    partial = settings.adapters_dir / ".1.0.0.partial"
    assert (partial / "FAILED").exists() and (partial / "checkpoint" / "trainer_state.pt").exists()
    assert registry.load(settings)["adapters"] == {}

    steps_seen = []
    resumed = run_training(fast(settings, max_steps=99), resume=True, progress=lambda e: e["event"] == "step" and steps_seen.append(e["step"]))
    assert steps_seen == [3, 4, 5, 6]  # continued after the step-2 checkpoint, with the run's own settings
    assert resumed["version"] == "1.0.0" and resumed["metrics"]["resumed_at_step"] == 2 and resumed["metrics"]["steps"] == 6
    assert not partial.exists()
    rows = [orjson.loads(line) for line in (settings.home / resumed["path"] / "metrics.jsonl").read_bytes().splitlines()]
    straight_rows = [orjson.loads(line) for line in (straight_settings.home / straight["path"] / "metrics.jsonl").read_bytes().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [round(r["loss"], 5) for r in rows] == [round(r["loss"], 5) for r in straight_rows]  # same data, RNG, optimizer
    from safetensors.torch import load_file

    got = load_file(str(settings.home / resumed["path"] / "adapter_model.safetensors"))
    want = load_file(str(straight_settings.home / straight["path"] / "adapter_model.safetensors"))
    assert all((got[n] - want[n]).abs().max() < 1e-6 for n in want)

    with pytest.raises(NothingToDo):
        run_training(fast(settings), resume=True)


def test_nan_loss_registers_nothing_and_marks_the_run_failed(settings):
    add_snapshot(settings, [qa(*f) for f in FACTS])
    with pytest.raises(TrainingFailed) as info:
        run_training(fast(settings, learning_rate=1e30, max_steps=5, warmup_ratio=0.0))
    assert "became" in info.value.message and ".1.0.0.partial" in info.value.message
    failed = orjson.loads((settings.adapters_dir / ".1.0.0.partial" / "FAILED").read_bytes())
    assert "nan" in failed["reason"].lower() or "inf" in failed["reason"].lower()
    doc = registry.load(settings)
    assert doc["adapters"] == {} and doc["champion"] is None
    assert not (settings.adapters_dir / "1.0.0").exists()
    events = [orjson.loads(line) for line in settings.learning_events.read_bytes().splitlines()]
    assert events[-1]["event"] == "train_failed" and events[-1]["version"] == "1.0.0"

    # The next ordinary run replaces the failed one and succeeds.
    entry = run_training(fast(settings))
    assert entry["version"] == "1.0.0" and not (settings.adapters_dir / ".1.0.0.partial").exists()


def test_a_second_concurrent_training_hits_the_lock(settings):
    add_snapshot(settings, [qa(*f) for f in FACTS])
    started, release = threading.Event(), threading.Event()
    outcome: dict = {}

    def hold(event):
        if event["event"] == "step":
            started.set()
            release.wait(60)

    def first():
        try:
            outcome["entry"] = run_training(fast(settings), progress=hold)
        except BaseException as exc:  # noqa: BLE001
            outcome["error"] = exc

    worker = threading.Thread(target=first)
    worker.start()
    try:
        assert started.wait(60), outcome
        with pytest.raises(LockHeldError) as info:
            run_training(fast(settings))
        assert "train" in info.value.message and "pid" in info.value.message
    finally:
        release.set()
        worker.join(120)
    assert outcome.get("entry", {}).get("version") == "1.0.0", outcome


def test_cli_train(workspace, settings):
    from typer.testing import CliRunner

    from continuous_learning.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["train", "--no-4bit", "--steps", "2"])
    assert result.exit_code == 0 and "no curated snapshot" in result.output
    add_snapshot(settings, [qa(*f) for f in FACTS])
    args = ["train", "--no-4bit", "--steps", "2", "--max-seq-len", "64", "--rank", "4", "--alpha", "8", "--lr", "1e-3", "--seed", "5"]
    result = runner.invoke(app, args + ["--note", "from cli", "--json"])
    assert result.exit_code == 0, result.output
    entry = orjson.loads(result.stdout)
    assert entry["version"] == "1.0.0" and entry["note"] == "from cli"
    hyper = entry["hyperparameters"]
    assert (hyper["lora_r"], hyper["lora_alpha"], hyper["learning_rate"], hyper["seed"], hyper["load_in_4bit"]) == (4, 8, 1e-3, 5, False)
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "adapter 1.1.0" in result.stdout and "adapters/1.1.0" in result.stdout
    result = runner.invoke(app, ["train", "--lr", "-1"])
    assert result.exit_code == ConfigError.exit_code and "learning_rate" in result.output


# --- the real bundled model -------------------------------------------------------------------------------------
@pytest.mark.real_model
def test_real_smollm2_qlora_learns_and_registers(real_workspace):
    settings = load_settings()
    facts = [qa(*f) for f in FACTS[:3]]
    add_snapshot(settings, facts, eval_examples=facts[:1])
    started = time.perf_counter()
    real = dataclasses.replace(
        settings, train=dataclasses.replace(settings.train, max_steps=9, max_seq_len=128, checkpoint_every=0, rehearsal_examples=0)
    )
    entry = run_training(real, note="real model")
    seconds = time.perf_counter() - started
    metrics = entry["metrics"]
    assert entry["version"] == "1.0.0" and entry["status"] == "candidate"
    assert entry["hyperparameters"]["load_in_4bit"] is True and entry["base_model"]["name"] == "SmolLM2-135M-Instruct"
    assert metrics["final_loss"] < metrics["initial_loss"]  # last pass over the 3 facts vs the first
    assert metrics["eval_loss"] < metrics["eval_loss_start"]
    assert (settings.home / entry["path"] / "adapter_model.safetensors").exists()
    print(f"\nreal QLoRA: {metrics['tokens_per_s']:.0f} tok/s, loss {metrics['initial_loss']:.3f} -> {metrics['final_loss']:.3f}, "
          f"eval {metrics['eval_loss_start']:.3f} -> {metrics['eval_loss']:.3f}, timings {entry['timings']}, run {seconds:.1f} s")


@pytest.mark.real_model
def test_the_shipped_rehearsal_references_are_the_bundled_models_own(real_workspace):
    """The package ships the frozen base's KL targets on the rehearsal answers for the defaults, so a new user's
    first run does not measure them: a default run's anchors must find that file, and it must hold what the 4-bit
    base gives now (checked on the first anchors)."""
    import torch

    from continuous_learning.chat.models import load_tokenizer, resolve_base
    from continuous_learning.core.settings import SHIPPED_DATA
    from continuous_learning.train import references
    from continuous_learning.train.data import prepare_data
    from continuous_learning.train.losses import Forward
    from continuous_learning.train.model_build import build_model

    settings = load_settings()
    snapshot = add_snapshot(settings, [qa(*f) for f in FACTS[:2]])
    base = resolve_base(settings)
    tokenizer = load_tokenizer(base)
    data = prepare_data(settings, base, tokenizer, snapshot, settings.home / snapshot["file"], print, print)
    cache = references.reference_cache(settings.model_cache, base.sha256, True, data.anchors)
    shipped = references.cached_reference(SHIPPED_DATA / cache.name)
    assert shipped is not None, f"no shipped reference for the defaults: copy {cache} (after a default run) to data/"
    built = build_model(base, settings.train, None)
    first = data.anchors[:8]
    fresh = references.measure_reference(Forward(built.model.device, built.autocast, built.logits_to_keep),
                                         built.model, first, tokenizer.pad_token_id)
    # The 4-bit base computes in bf16, whose rounding differs between CPUs (AVX-512 BF16 or not): a position's
    # log-probabilities move by about one bf16 step (0.06-0.13 at these logits) and near-ties swap. A stale file
    # (another base, other anchors) disagrees on most positions.
    assert [r.shape for r in fresh["ids"]] == [r.shape for r in shipped["ids"][:8]]  # the same anchors' positions
    top_ids, shipped_ids = (torch.cat([r[:, 0] for r in rows]) for rows in (fresh["ids"], shipped["ids"][:8]))
    top_logp, shipped_logp = (torch.cat([r[:, 0].float() for r in rows])
                              for rows in (fresh["logp"], shipped["logp"][:8]))
    agree, drift = (top_ids == shipped_ids).float().mean(), (top_logp - shipped_logp).abs().mean()
    assert agree >= 0.9 and drift < 0.1, (float(agree), float(drift))


@pytest.mark.real_model
def test_the_cpus_4bit_copy_of_the_base_is_made_once_and_is_bit_identical(real_workspace, tmp_path):
    """Quantizing the base to NF4 costs seconds on a CPU at every load; the quantized copy in the model cache loads
    in a fraction of that and holds exactly the weights quantizing gives."""
    import torch

    from continuous_learning.chat.models import resolve_base
    from continuous_learning.chat.runtime import load_model

    base = resolve_base(load_settings())
    quantized_now = load_model(base, load_in_4bit=True, for_training=True).state_dict()
    made = load_model(base, load_in_4bit=True, for_training=True, quantized_cache=tmp_path).state_dict()
    [copy] = [p for p in tmp_path.iterdir() if p.name.startswith("nf4-")]
    assert (copy / "config.json").is_file() and not list(tmp_path.glob(".*partial"))
    loaded = load_model(base, load_in_4bit=True, for_training=True, quantized_cache=tmp_path).state_dict()
    assert quantized_now.keys() == made.keys() == loaded.keys()
    assert all(torch.equal(quantized_now[k], loaded[k]) and torch.equal(made[k], loaded[k]) for k in loaded)
