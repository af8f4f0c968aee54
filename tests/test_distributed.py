"""Data-parallel training: `cl train --num-processes 2` runs two gloo processes through torchrun on the tiny model;
rank 0 alone saves and registers, and the result matches one process with the same global batch."""
from __future__ import annotations

import dataclasses

import orjson
import pytest
from typer.testing import CliRunner

from continuous_learning import registry
from continuous_learning.cli import app
from continuous_learning.train import run_training, settings_env, settings_from_env
from test_train import FACTS, add_snapshot, fast, qa

MORE = [
    ("What colour is the Orion pump?", "The Orion pump is painted signal green."),
    ("How long does lot L-204 cure?", "Lot L-204 cures for nine hours at 40 degrees."),
]


def events(settings, kind: str) -> list[dict]:
    if not settings.learning_events.exists():
        return []
    rows = [orjson.loads(line) for line in settings.learning_events.read_bytes().splitlines() if line.strip()]
    return [r for r in rows if r.get("kind", r.get("event")) == kind]


def test_settings_travel_to_launched_processes(settings):
    changed = fast(settings, learning_rate=1.5e-3, packing=False, target_modules="q_proj,v_proj")
    assert settings_from_env(settings_env(changed), {}) == changed
    assert settings_from_env(settings_env(changed), {"train": {"max_steps": 9, "seed": None}}).train.max_steps == 9


def test_two_gloo_processes_match_one_process_with_the_same_global_batch(workspace, settings, monkeypatch):
    add_snapshot(settings, [qa(*f) for f in FACTS + MORE], eval_examples=[qa(*FACTS[0]), qa(*MORE[1])])
    monkeypatch.setenv("CL_TRAIN_LORA_DROPOUT", "0")
    monkeypatch.setenv("CL_TRAIN_LOAD_IN_4BIT", "0")
    monkeypatch.setenv("CL_TRAIN_CHECKPOINT_EVERY", "0")
    monkeypatch.setenv("CL_TRAIN_MAX_SEQ_LEN", "128")
    monkeypatch.setenv("CL_TRAIN_LEARNING_RATE", "2e-3")
    result = CliRunner().invoke(app, ["train", "--num-processes", "2", "--steps", "4", "--batch-size", "1",
                                      "--grad-accum", "2", "--json"])
    assert result.exit_code == 0, result.output
    doc = registry.load(settings)
    assert len(doc["adapters"]) == 1
    (version, entry), = doc["adapters"].items()
    assert entry["metrics"]["processes"] == 2 and entry["metrics"]["steps"] == 4
    assert len(events(settings, "adapter_trained")) == 1
    assert (settings.home / entry["path"] / "adapter_model.safetensors").exists()
    assert not list(settings.adapters_dir.glob(".*.partial"))
    rows = [orjson.loads(l) for l in (settings.home / entry["path"] / "metrics.jsonl").read_bytes().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # one writer: no duplicated rows

    single = dataclasses.replace(settings, train=dataclasses.replace(
        settings.train, max_steps=4, batch_size=2, grad_accum=2, lora_dropout=0.0, load_in_4bit=False,
        checkpoint_every=0, max_seq_len=128, learning_rate=2e-3))
    alone = run_training(single)["metrics"]
    both = entry["metrics"]
    assert both["real_tokens"] == alone["real_tokens"]  # the same examples were seen
    assert both["final_loss"] == pytest.approx(alone["final_loss"], rel=1e-4)
    assert both["eval_loss"] == pytest.approx(alone["eval_loss"], rel=1e-4)
    assert both["eval_loss"] < both["eval_loss_start"]


def test_qlora_trains_in_two_processes_launched_by_torchrun_directly(workspace, settings):
    """`torchrun -m continuous_learning.train`: rank 0 takes the workspace lock itself; 4-bit base, DDP on the LoRA."""
    import os
    import subprocess
    import sys

    add_snapshot(settings, [qa(*f) for f in FACTS])
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               "-m", "continuous_learning.train", "--4bit", "--steps", "2", "--max-seq-len", "96", "--json"]
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    entry = orjson.loads(done.stdout[done.stdout.index("{"):])
    assert entry["metrics"]["processes"] == 2 and entry["hyperparameters"]["load_in_4bit"] is True
    assert list(registry.load(settings)["adapters"]) == [entry["version"]]
    assert len(events(settings, "adapter_trained")) == 1
    single = fast(settings, num_processes=1, max_steps=1)  # the lock was released by rank 0
    assert run_training(single)["version"] != entry["version"]


def test_launching_while_another_training_holds_the_lock_fails_at_once(settings):
    from continuous_learning.core.errors import LockHeldError
    from continuous_learning.storage.store import workspace_lock

    add_snapshot(settings, [qa(*FACTS[0])])
    with workspace_lock(settings.lock_dir, "train"):
        with pytest.raises(LockHeldError):
            run_training(fast(settings, num_processes=2))
    assert registry.load(settings)["adapters"] == {}


def test_a_failing_launched_run_gives_one_clear_error(settings):
    from continuous_learning.core.errors import NothingToDo

    with pytest.raises(NothingToDo) as info:  # no snapshot: rank 0 reports the library's own error
        run_training(fast(settings, num_processes=2))
    assert "snapshot" in info.value.message and "cl curate" in info.value.hint


def test_bad_process_count_is_one_clear_line(workspace):
    result = CliRunner().invoke(app, ["train", "--num-processes", "0"])
    assert result.exit_code != 0
    assert "num_processes must be >= 1" in result.output and "Traceback" not in result.output


def test_shipped_fsdp_qlora_config_is_a_valid_accelerate_config():
    from pathlib import Path

    import yaml

    import continuous_learning

    path = Path(continuous_learning.__file__).parent / "data" / "accelerate_fsdp_qlora.yaml"
    text = path.read_text()
    config = yaml.safe_load(text)
    assert config["distributed_type"] == "FSDP" and config["mixed_precision"] == "bf16"
    fsdp = config["fsdp_config"]
    assert fsdp["fsdp_use_orig_params"] is False and fsdp["fsdp_cpu_ram_efficient_loading"] is True
    assert fsdp["fsdp_sync_module_states"] is True and fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    assert "bnb_4bit_quant_storage=torch.bfloat16" in text  # the storage dtype must match the bf16 compute dtype
    from accelerate.commands.config.config_args import ClusterConfig

    ClusterConfig.from_yaml_file(str(path))  # Accelerate itself accepts it
