"""A/B tests: pure statistics, routing, the state file and events, the chat's per-session arms, the CLI."""
from __future__ import annotations

import hashlib
import math

import orjson
import pytest
from rich.console import Console
from typer.testing import CliRunner

from continuous_learning import cli, registry
from continuous_learning.capture.ingest import Recorder, Turn
from continuous_learning.core.errors import CLError, InputError, NothingToDo, RegistryError
from continuous_learning.core.records import Feedback
from continuous_learning.core.settings import ABConfig
from continuous_learning.monitor import ab


def invoke(*args: str):
    return CliRunner().invoke(cli.app, list(args))


def events(settings, kind: str | None = None) -> list[dict]:
    if not settings.learning_events.exists():
        return []
    rows = [orjson.loads(line) for line in settings.learning_events.read_bytes().splitlines()]
    return [r for r in rows if kind is None or r["event"] == kind]


# --- helpers shared with test_health / test_cycle ---------------------------------------------------------
def fake_adapter(settings, version: str) -> None:
    """A registered adapter whose (tiny, non-PEFT) file verifies against its sha256: enough for the registry."""
    folder = settings.adapters_dir / version
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(f'{{"version": "{version}"}}')
    digest = hashlib.sha256((folder / "adapter_config.json").read_bytes()).hexdigest()
    entry = {"version": version, "status": "candidate", "path": f"adapters/{version}",
             "sha256": {"adapter_config.json": digest}}
    registry.update(settings, lambda d: registry.register_adapter(d, entry), "register", version=version)


def record(settings, version: str | None, helpful: int, unhelpful: int, arm: str | None = None, unrated: int = 0,
           late: bool = False) -> None:
    """Turns answered by `version` through the Recorder: `helpful` rated 5, `unhelpful` rated 1, `unrated` not rated.

    With `late`, the ratings arrive as separate feedback events (as `cl feedback` writes them)."""
    scores = [5] * helpful + [1] * unhelpful + [None] * unrated
    recorder = Recorder(settings)
    turns = [
        Turn(messages=[{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}],
             session_id=f"s-{version}-{arm}-{i}", adapter_version=version, ab_arm=arm,
             feedback=Feedback() if late or score is None else Feedback(score=score))
        for i, score in enumerate(scores)
    ]
    interactions = recorder.record_turns(turns)
    if late:
        for interaction, score in zip(interactions, scores):
            if score is not None:
                recorder.record_feedback(interaction, Feedback(score=score))


# --- pure statistics ----------------------------------------------------------------------------------------
def test_assign_arm_splits_traffic_and_is_sticky():
    ids = [f"session-{i}" for i in range(10_000)]
    arms = [ab.assign_arm(s, "t1", 0.1) for s in ids]
    share = arms.count("candidate") / len(ids)
    assert 0.09 <= share <= 0.11
    assert arms == [ab.assign_arm(s, "t1", 0.1) for s in ids]  # same session, same arm
    other_test = [ab.assign_arm(s, "t2", 0.1) for s in ids]
    assert other_test != arms  # each test draws its own split
    half = [ab.assign_arm(s, "t1", 0.5) for s in ids].count("candidate") / len(ids)
    assert 0.48 <= half <= 0.52
    # raising the share only adds sessions to the candidate arm
    assert all(ab.assign_arm(s, "t1", 0.5) == "candidate" for s, a in zip(ids, arms) if a == "candidate")


def test_two_proportion_z_matches_hand_values_and_scipy():
    from scipy.stats import chi2_contingency, norm

    z, p = ab.two_proportion_z(45, 100, 30, 100)
    pooled = 75 / 200
    expected_z = 0.15 / math.sqrt(pooled * (1 - pooled) * (2 / 100))
    assert z == pytest.approx(expected_z) and z == pytest.approx(2.19089, abs=1e-5)
    assert p == pytest.approx(2 * norm.sf(expected_z))
    chi2, chi_p, _, _ = chi2_contingency([[45, 55], [30, 70]], correction=False)
    assert z**2 == pytest.approx(chi2) and p == pytest.approx(chi_p)
    _, greater = ab.two_proportion_z(45, 100, 30, 100, alternative="greater")
    _, less = ab.two_proportion_z(45, 100, 30, 100, alternative="less")
    assert greater == pytest.approx(norm.sf(expected_z)) and less == pytest.approx(norm.cdf(expected_z))
    assert ab.two_proportion_z(0, 0, 3, 10) == (0.0, 1.0)
    assert ab.two_proportion_z(10, 10, 5, 5) == (0.0, 1.0)  # no variance: no evidence


def test_diff_ci_hand_computed():
    diff, low, high = ab.diff_ci(45, 100, 30, 100)
    half = 1.959964 * math.sqrt(0.45 * 0.55 / 100 + 0.30 * 0.70 / 100)
    assert diff == pytest.approx(0.15)
    assert (low, high) == (pytest.approx(0.15 - half, abs=1e-6), pytest.approx(0.15 + half, abs=1e-6))
    assert (low, high) == (pytest.approx(0.01743, abs=1e-5), pytest.approx(0.28257, abs=1e-5))
    _, low99, high99 = ab.diff_ci(45, 100, 30, 100, level=0.99)
    assert low99 < low and high99 > high


def stats(champ: tuple[int, int], cand: tuple[int, int]) -> dict:
    return ab.compare_arms(ab.Tally(champ[1], champ[0]), ab.Tally(cand[1], cand[0]), alpha=0.05)


def test_promotion_decision_names_every_missing_condition():
    config = ABConfig(min_samples=30, alpha=0.05, min_improvement=0.02)
    ok, reasons = ab.promotion_decision(stats((10, 20), (15, 20)), config)
    assert not ok and any("champion arm has 20 rated" in r
                          for r in reasons) and any("candidate arm has 20" in r for r in reasons)
    ok, reasons = ab.promotion_decision(stats((50, 100), (55, 100)), config)
    assert not ok and any("not significant" in r for r in reasons)
    ok, reasons = ab.promotion_decision(stats((500, 1000), (700, 1000)), config)
    assert ok and "candidate better by +20.0 points" in reasons[0]
    ok, reasons = ab.promotion_decision(stats((5000, 10000), (5150, 10000)), config)  # significant, but only 1.5 points
    assert not ok and reasons == ["improvement +1.5 points is below the required 2.0"]
    ok, _ = ab.promotion_decision(stats((700, 1000), (500, 1000)), config)  # significantly worse
    assert not ok


# --- the state file, events and promotion -------------------------------------------------------------------
@pytest.fixture
def ab_workspace(settings):
    fake_adapter(settings, "1.0.0")
    fake_adapter(settings, "1.1.0")
    registry.promote_version(settings, "1.0.0", "first", forced=True)
    return settings


def test_start_validates_and_writes_the_state_file(ab_workspace):
    settings = ab_workspace
    with pytest.raises(RegistryError, match="no adapter version '9.9.9'"):
        ab.start_test(settings, "9.9.9")
    with pytest.raises(InputError, match="already the champion"):
        ab.start_test(settings, "1.0.0")
    with pytest.raises(InputError, match="between 0 and 1"):
        ab.start_test(settings, "1.1.0", traffic=1.5)
    test = ab.start_test(settings, "1.1.0")
    state = orjson.loads(ab.state_file(settings).read_bytes())
    assert state == test
    assert state["candidate"] == "1.1.0" and state["champion"] == "1.0.0" and state["status"] == "running"
    assert state["traffic"] == settings.ab.traffic == 0.1 and state["id"] and state["started_at"].endswith("Z")
    with pytest.raises(CLError, match="already running"):
        ab.start_test(settings, "1.1.0", traffic=0.2)
    (started,) = events(settings, "ab_start")
    assert started["test_id"] == test["id"] and started["candidate"] == "1.1.0" and started["traffic"] == 0.1


def test_tainted_candidate_is_refused(ab_workspace):
    registry.update(ab_workspace, lambda d: d["adapters"]["1.1.0"].update(status="tainted") or d, "forget")
    with pytest.raises(RegistryError, match="tainted"):
        ab.start_test(ab_workspace, "1.1.0")


def test_status_counts_rated_turns_per_arm_with_late_feedback(ab_workspace):
    settings = ab_workspace
    record(settings, "1.0.0", helpful=3, unhelpful=1, arm="champion")  # before the test: not counted
    ab.start_test(settings, "1.1.0", traffic=0.3)
    record(settings, "1.0.0", helpful=6, unhelpful=4, arm="champion", unrated=2)
    record(settings, "1.1.0", helpful=8, unhelpful=2, arm="candidate", late=True)
    record(settings, "1.0.0", helpful=5, unhelpful=0, arm=None)  # not in the test (e.g. an older session)
    report = ab.status_report(settings)
    s = report["stats"]
    assert s["champion"] == {"rated": 10, "helpful": 6, "helpful_rate": 0.6}
    assert s["candidate"] == {"rated": 10, "helpful": 8, "helpful_rate": 0.8}
    z, p = ab.two_proportion_z(8, 10, 6, 10)
    assert s["difference"] == pytest.approx(0.2) and s["p_value"] == pytest.approx(p) and s["z"] == pytest.approx(z)
    assert report["would_promote"] is False
    out = invoke("ab", "status")
    assert out.exit_code == 0, out.output
    assert "champion  rated    10  helpful     6  rate 60.0%" in out.output
    assert "difference +20.0 points, 95% CI" in out.output and "would not promote" in out.output
    assert orjson.loads(invoke("ab", "status", "--json").output)["stats"]["candidate"]["rated"] == 10


def test_stop_promote_refuses_too_few_samples_and_says_why(ab_workspace):
    settings = ab_workspace
    ab.start_test(settings, "1.1.0")
    record(settings, "1.0.0", helpful=2, unhelpful=8, arm="champion")
    record(settings, "1.1.0", helpful=9, unhelpful=1, arm="candidate")
    out = invoke("ab", "stop", "--promote")
    assert out.exit_code == 0, out.output
    assert "stopped without promoting 1.1.0" in out.output and "needs at least 30" in out.output
    assert registry.load(settings)["champion"] == "1.0.0"
    state = orjson.loads(ab.state_file(settings).read_bytes())
    assert state["status"] == "stopped" and state["promoted"] is False and state["stopped_at"]
    (stopped,) = events(settings, "ab_stop")
    assert stopped["promoted"] is False and stopped["promote_requested"] is True and stopped["candidate_rated"] == 10
    again = invoke("ab", "stop")
    assert again.exit_code == 0 and "no A/B test is running" in again.output


def test_stop_promote_promotes_a_significant_winner(ab_workspace):
    settings = ab_workspace
    ab.start_test(settings, "1.1.0", traffic=0.5)
    record(settings, "1.0.0", helpful=15, unhelpful=20, arm="champion")
    record(settings, "1.1.0", helpful=30, unhelpful=5, arm="candidate")
    report = ab.stop_test(settings, promote=True)
    assert report["promoted"] is True and report["test"]["status"] == "stopped"
    doc = registry.load(settings)
    assert doc["champion"] == "1.1.0" and doc["history"][-1]["reason"].startswith(f"A/B test {report['test']['id']}")
    assert doc["history"][-1]["forced"] is False
    (stopped,) = events(settings, "ab_stop")
    assert stopped["promoted"] is True and stopped["p_value"] < 0.05
    assert ab.running_test(settings) is None
    with pytest.raises(NothingToDo):
        ab.stop_test(settings)


def test_stop_without_promote_keeps_the_champion(ab_workspace):
    settings = ab_workspace
    ab.start_test(settings, "1.1.0")
    record(settings, "1.0.0", helpful=15, unhelpful=20, arm="champion")
    record(settings, "1.1.0", helpful=30, unhelpful=5, arm="candidate")
    out = invoke("ab", "stop")
    assert out.exit_code == 0 and "stopped (nothing promoted" in out.output
    assert registry.load(settings)["champion"] == "1.0.0"


def test_cli_errors_are_one_line(ab_workspace):
    out = invoke("ab", "start", "7.7.7")
    assert out.exit_code == 4 and "no adapter version '7.7.7'" in out.output and "Traceback" not in out.output
    out = invoke("ab", "start", "1.1.0", "--traffic", "0")
    assert out.exit_code == 2 and "between 0 and 1" in out.output
    assert not ab.state_file(ab_workspace).exists()
    ok = invoke("ab", "start", "1.1.0", "--traffic", "0.25")
    assert ok.exit_code == 0 and "25% of new chat sessions answered by 1.1.0" in ok.output


# --- the chat routes sessions by arm --------------------------------------------------------------------------
def peft_adapter(settings, tiny_model_dir, version: str, seed: int) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, lora_alpha=64, target_modules="all-linear", init_lora_weights=False))
    folder = settings.adapters_dir / version
    model.save_pretrained(str(folder))
    files = ("adapter_model.safetensors", "adapter_config.json")
    digests = {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in files}
    entry = {"version": version, "status": "candidate", "path": f"adapters/{version}", "sha256": digests}
    registry.update(settings, lambda d: registry.register_adapter(d, entry), "register", version=version)


def session_id_for(arm: str, test: dict) -> str:
    return next(s for s in (f"sess-{i}" for i in range(1000)) if ab.assign_arm(s, test["id"], test["traffic"]) == arm)


def test_chat_answers_each_session_from_its_arm(settings, tiny_model_dir):
    from continuous_learning.chat.models import ChatModel
    from continuous_learning.chat.repl import ChatSession
    from continuous_learning.storage.store import iter_jsonl

    peft_adapter(settings, tiny_model_dir, "1.0.0", seed=1)
    peft_adapter(settings, tiny_model_dir, "1.1.0", seed=2)
    registry.promote_version(settings, "1.0.0", "first", forced=True)
    chat_model = ChatModel.load(settings)

    def session(inputs: list[str], session_id: str | None = None) -> tuple[ChatSession, str]:
        console = Console(record=True, width=200)
        queue = list(inputs)

        def read(prompt: str) -> str:
            if not queue:
                raise EOFError
            return queue.pop(0)

        chat = ChatSession(settings, read, console, chat_model=chat_model)
        if session_id:
            chat.session_id = session_id
        chat.run()
        return chat, console.export_text()

    early = ChatSession(settings, lambda p: (_ for _ in ()).throw(EOFError), Console(record=True),
                        chat_model=chat_model)
    test = ab.start_test(settings, "1.1.0", traffic=0.5)
    _, out_candidate = session(["hello", "5", "again", "1", "/adapter", "/quit"], session_id_for("candidate", test))
    _, out_champion = session(["hello", "4", "/adapter", "/quit"], session_id_for("champion", test))
    early.run()  # started before the test: never routed, answered by the champion
    before_asking = out_candidate.split("adapter: 1.1.0; base")[0]
    assert "1.1.0" not in before_asking and "candidate" not in before_asking  # not told which arm answers, unless asked
    assert "A/B test arm: candidate" in out_candidate and "an A/B test is running" in out_candidate
    assert "A/B test arm: champion" in out_champion
    turns = [r for _, r in iter_jsonl(settings.raw_log) if r["type"] == "interaction"]
    assert [(t["ab_arm"], t["adapter_version"])
            for t in turns] == [("candidate", "1.1.0")] * 2 + [("champion", "1.0.0")]
    assert set(chat_model.adapters) == {"1.0.0", "1.1.0"}  # both side by side over the one base model
    report = ab.status_report(settings)["stats"]
    assert report["candidate"]["rated"] == 2 and report["candidate"]["helpful"] == 1
    assert report["champion"] == {"rated": 1, "helpful": 1, "helpful_rate": 1.0}


def test_two_concurrent_starts_leave_exactly_one_test(ab_workspace):
    import subprocess
    import sys

    command = [sys.executable, "-m", "continuous_learning.cli", "ab", "start", "1.1.0"]
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=120), p.communicate()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 1], results
    assert any("already running" in err for _, (_, err) in results)
    assert len(events(ab_workspace, "ab_start")) == 1
    assert ab.running_test(ab_workspace)["candidate"] == "1.1.0"


def test_a_forget_that_taints_the_candidate_stops_it_serving_in_the_chat(settings, tiny_model_dir):
    from continuous_learning.capture.privacy import hash_user_id
    from continuous_learning.chat.models import ChatModel
    from continuous_learning.chat.repl import ChatSession
    from continuous_learning.storage.store import iter_jsonl, read_json

    peft_adapter(settings, tiny_model_dir, "1.0.0", seed=1)
    peft_adapter(settings, tiny_model_dir, "1.1.0", seed=2)
    alice = hash_user_id("alice", b"test-salt")
    registry.update(settings, lambda d: d["adapters"]["1.1.0"].update(user_hashes=[alice]) or d, "test_lineage")
    registry.promote_version(settings, "1.0.0", "first", forced=True)
    test = ab.start_test(settings, "1.1.0", traffic=0.5)
    forget = object()
    queue = ["hello", "5", forget, "again", "1", "/quit"]

    def read(prompt: str) -> str:
        item = queue.pop(0) if queue else "/quit"
        if item is forget:  # `cl forget` in another shell, between two turns of this session
            assert invoke("forget", "--user", "alice", "--yes").exit_code == 0
            item = queue.pop(0)
        return item

    chat = ChatSession(settings, read, Console(record=True, width=200), chat_model=ChatModel.load(settings),
                       user_id="tester")
    chat.session_id = session_id_for("candidate", test)
    chat.run()
    turns = [r for _, r in iter_jsonl(settings.raw_log) if r["type"] == "interaction"]
    assert [(t["ab_arm"], t["adapter_version"]) for t in turns] == [("candidate", "1.1.0"), (None, "1.0.0")]
    state = read_json(ab.state_file(settings))
    assert state["status"] == "stopped" and "forgotten user" in state["reason"]
    assert not (settings.adapters_dir / "1.1.0" / "adapter_model.safetensors").exists()


def test_the_chat_never_serves_an_adapter_whose_files_changed(settings, tiny_model_dir):
    from continuous_learning.chat.models import ChatModel
    from continuous_learning.chat.repl import ChatSession
    from continuous_learning.storage.store import iter_jsonl

    peft_adapter(settings, tiny_model_dir, "1.0.0", seed=1)
    registry.promote_version(settings, "1.0.0", "first", forced=True)
    with open(settings.adapters_dir / "1.0.0" / "adapter_model.safetensors", "ab") as weights:
        weights.write(b"\0" * 8)
    console = Console(record=True, width=200)
    queue = ["hello", "", "/quit"]
    ChatSession(settings, lambda p: queue.pop(0), console, chat_model=ChatModel.load(settings)).run()
    assert "does not match its recorded sha256" in console.export_text()
    turns = [r for _, r in iter_jsonl(settings.raw_log) if r["type"] == "interaction"]
    assert [t["adapter_version"] for t in turns] == [None]  # answered by the base, not the changed weights
