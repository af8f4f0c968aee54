"""The whole loop as a user runs it: ingest -> cl curate --train --eval -> promote -> rollback."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from typer.testing import CliRunner

import continuous_learning
from continuous_learning import cli, registry
from continuous_learning.core.settings import load_settings

DEMO_DATA = Path(continuous_learning.__file__).parent / "data"


def invoke(*args: str):
    return CliRunner().invoke(cli.app, list(args))


@pytest.fixture
def loop_workspace(workspace, monkeypatch):
    monkeypatch.setenv("CL_TRAIN_MAX_STEPS", "4")
    monkeypatch.setenv("CL_TRAIN_MAX_SEQ_LEN", "96")
    monkeypatch.setenv("CL_EVAL_MAX_NEW_TOKENS", "4")
    monkeypatch.setenv("CL_CURATE_DOMAIN_CAP", "1.0")
    (workspace / "eval").mkdir()
    shutil.copyfile(DEMO_DATA / "demo_eval.jsonl", workspace / "eval" / "qa_eval.jsonl")
    assert invoke("ingest", str(DEMO_DATA / "demo_interactions.jsonl")).exit_code == 0
    return workspace


def test_curate_train_eval_in_one_command(loop_workspace):
    result = invoke("curate", "--train", "--eval", "--note", "weekly update", "--json")
    assert result.exit_code == 0, result.output
    out = orjson.loads(result.output[result.output.index("{"):])
    assert out["curate"]["status"] == "created"
    assert out["train"]["version"] == "1.0.0" and out["train"]["snapshot"]["id"] == out["curate"]["id"]
    assert out["train"]["note"] == "weekly update"
    report = out["eval"]
    assert report["subject"]["label"] == "1.0.0" and report["against"]["label"] == "base"
    assert report["decision"] is not None and isinstance(report["promoted"], bool)
    doc = registry.load(load_settings())
    entry = doc["adapters"]["1.0.0"]
    assert entry["evals"] and entry["evals"][-1]["total"] == 6
    assert doc["champion"] == ("1.0.0" if report["promoted"] else None)
    assert (loop_workspace / "adapters" / "1.0.0" / "adapter_model.safetensors").exists()

    again = invoke("curate", "--train", "--eval")
    assert again.exit_code == 0 and "nothing to train on" in again.output
    assert set(registry.load(load_settings())["adapters"]) == {"1.0.0"}


def test_promote_then_rollback_through_the_cli(loop_workspace):
    assert invoke("curate", "--train", "--eval", "--no-promote").exit_code == 0
    assert registry.load(load_settings())["champion"] is None
    assert invoke("promote", "1.0.0").exit_code == 0
    assert registry.load(load_settings())["champion"] == "1.0.0"
    listing = invoke("adapters")
    assert "1.0.0" in listing.output and "champion" in listing.output
    rolled = invoke("rollback")
    assert rolled.exit_code == 0, rolled.output
    assert registry.load(load_settings())["champion"] is None


def test_pipeline_module_runs_the_stages(loop_workspace):
    done = subprocess.run([sys.executable, "-m", "continuous_learning.pipeline", "--curate", "--train", "--eval",
                           "--json"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert set(out) == {"curate", "train", "eval"}
    assert out["eval"]["subject"]["label"] == out["train"]["version"]


def test_without_a_keyword_file_the_loop_evaluates_on_questions_from_the_snapshot(loop_workspace):
    (loop_workspace / "eval" / "qa_eval.jsonl").unlink()
    result = invoke("curate", "--train", "--eval")
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "no eval/qa_eval.jsonl: evaluating on questions derived from the new snapshot" in said
    entry = registry.load(load_settings())["adapters"]["1.0.0"]
    latest = entry["evals"][-1]
    assert latest["eval_file"]["derived"] and "derived from snapshot" in latest["eval_file"]["name"]
    assert latest["total"] >= 5 and all(item["prompt"] for item in latest["items"])
    # and the shipped everyday set whenever it can change the decision (the tiny random model never gains)
    assert latest["general"]["total"] >= 50 if latest["general"] else latest["general_skipped"]


def test_a_broken_keyword_file_fails_before_any_training(loop_workspace):
    (loop_workspace / "eval" / "qa_eval.jsonl").write_text('{"prompt": "no keywords here"}\n')
    result = invoke("curate", "--train", "--eval")
    assert result.exit_code == 2 and "'keywords' must list at least one keyword" in result.output
    doc = registry.load(load_settings())
    assert doc["snapshots"] == [] and doc["adapters"] == {}  # nothing curated or trained: it was known up front


def test_every_form_of_the_loop_options_is_derived_from_one_declaration():
    from dataclasses import fields

    from continuous_learning.loop import jobs, pipeline, workflow
    from continuous_learning.serve import schemas

    declared = {f.name for f in fields(workflow.LoopOptions)}
    assert set(schemas.TrainRequest.model_fields) <= declared and set(jobs.TRAIN_KNOBS) <= declared
    flags = pipeline.build_parser().parse_args(["--curate", "--include-unrated", "--no-promote", "--note", "n"])
    chosen = (flags.curate, flags.include_unrated, flags.promote, flags.note, flags.full)
    assert chosen == (True, True, False, "n", False)
    assert pipeline.build_parser().parse_args(["--eval"]).include_unrated is None  # None: the configured default


def test_a_cancelled_loop_stops_before_any_stage(settings):
    from continuous_learning.loop.workflow import CollectingEvents, LoopCancelled, LoopOptions, run_loop

    class Cancelled(CollectingEvents):
        def cancelled(self) -> bool:
            return True

    events = Cancelled()
    with pytest.raises(LoopCancelled):
        run_loop(settings, LoopOptions(curate=True, train=True), events)
    assert events.events == [] and registry.load(settings)["snapshots"] == []


def test_the_training_time_line_names_what_was_measured_once():
    """`cl train` ends with where its time went; measuring the base (KL targets, preference log-probs) is a stage of
    its own, shown only when a run had to do it."""
    from continuous_learning.cli.learn import time_breakdown, training_stages

    timings = {"prepare_s": 1.0, "model_s": 2.0, "kl_reference_s": 3.0, "preference_reference_s": 1.5,
               "train_loop_s": 10.0, "held_out_s": 0.5, "save_s": 0.01}
    line = time_breakdown(training_stages({"timings": timings}))
    assert line == ("prepare data 1.0 s, load model 2.0 s, measure the base 4.5 s, train 10.0 s, held-out loss 0.5 s"
                    " (total 18 s)")
    cached = time_breakdown(training_stages({"timings": {**timings, "kl_reference_s": 0.0,
                                                         "preference_reference_s": 0.0}}))
    assert "measure the base" not in cached
