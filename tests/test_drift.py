"""Drift: the statistics against hand-computed and scipy values, and `cl drift` on synthetic workspaces."""
from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import orjson
import pytest
from scipy.stats import fisher_exact, ks_2samp, norm
from typer.testing import CliRunner

from continuous_learning import cli, registry
from continuous_learning.core.records import Feedback, FeedbackEvent, Interaction
from continuous_learning.core.settings import load_settings
from continuous_learning.monitor import drift
from continuous_learning.storage import store

NOW = datetime.now(UTC)


@pytest.fixture
def settings(tmp_path, monkeypatch):
    """A bare workspace: drift never loads a model."""
    home = tmp_path / "ws"
    home.mkdir()
    monkeypatch.setenv("CL_HOME", str(home))
    monkeypatch.setenv("CL_USER_HASH_SALT", "test-salt")
    return load_settings()


def at(days_ago: float) -> str:
    return (NOW - timedelta(days=days_ago)).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def turn(prompt: str, days_ago: float, language: str = "en", tool: str | None = "erp", score: int | None = None,
         latency: float | None = 100.0, entities: list[str] | None = None, adapter: str | None = None,
         arm: str | None = None) -> Interaction:
    return Interaction(messages=[{"role": "user", "content": prompt},
                                 {"role": "assistant", "content": "answer " + prompt[:20]}],
                       session_id="s", language=language, target_tool=tool, latency_ms=latency,
                       feedback=Feedback(score=score), pii_entities=entities or [], adapter_version=adapter, ab_arm=arm,
                       created_at=at(days_ago), recorded_at=at(days_ago))


def append(settings, records) -> None:
    store.append_jsonl(settings.raw_log, [r.to_dict() if isinstance(r, Interaction) else r for r in records])


def window(count: int, first_day: float, last_day: float, prompt_len=lambda i: 20 + i % 10, **kw) -> list[Interaction]:
    """`count` turns spread evenly from `first_day` to `last_day` days ago; prompt lengths cycle 20..29 by default."""
    step = (first_day - last_day) / max(count - 1, 1)
    return [turn("x" * prompt_len(i), first_day - i * step, **kw) for i in range(count)]


def invoke(*args: str):
    return CliRunner().invoke(cli.app, list(args))


# --- pure statistics ---------------------------------------------------------------------------------------
def test_psi_matches_a_hand_computed_value():
    # shares 1/6, 1/3, 1/2 against 1/2, 1/3, 1/6: (1/3)ln3 + 0 + (1/3)ln3
    assert drift.psi([10, 20, 30], [30, 20, 10]) == pytest.approx(2 / 3 * math.log(3), rel=1e-12)
    assert drift.psi([5, 5], [50, 50]) == 0.0


def test_psi_uses_epsilon_for_an_empty_bin():
    eps = drift.EPSILON
    expected = (0.25 - 0.5) * math.log(0.25 / 0.5) + (0.25 - eps) * math.log(0.25 / eps)
    assert drift.psi([50, 50, 0], [50, 25, 25]) == pytest.approx(expected + 0.0, rel=1e-12)


def test_quantile_bins_split_the_reference_evenly_and_merge_ties():
    edges = drift.quantile_bins(list(range(100)), 4)
    assert edges == [24.75, 49.5, 74.25]
    assert drift.bin_counts(range(100), edges) == [25, 25, 25, 25]
    assert drift.bin_counts([-5, 1000], edges) == [1, 0, 0, 1]  # outside the reference: the open end bins
    tied = drift.quantile_bins([1] * 50 + [2] * 50, 10)
    assert tied == sorted(set(tied)) and len(tied) <= 3
    assert sum(drift.bin_counts([1] * 50 + [2] * 50, tied)) == 100
    assert drift.quantile_bins([], 10) == [] and drift.quantile_bins([3.0], 1) == []


def test_numeric_psi_is_zero_for_identical_samples_and_large_for_a_shift():
    ref = [float(i % 37) for i in range(300)]
    assert drift.numeric_psi(ref, list(ref), 10) == pytest.approx(0.0, abs=1e-12)
    assert drift.numeric_psi(ref, [v + 100 for v in ref], 10) > 1.0


def test_bin_count_shrinks_for_small_windows():
    # expected chance PSI (bins - 1) * (1/n + 1/n) must stay at most psi_warn / 4
    assert drift.usable_bins(30, 30, 10, 0.1) == 2
    assert drift.usable_bins(300, 300, 10, 0.1) == 4  # 1 + 0.025 / (2/300) = 4.75
    assert drift.usable_bins(5000, 5000, 10, 0.1) == 10
    assert drift.usable_bins(5000, 50, 10, 0.1) == 2


def test_two_random_samples_of_the_same_traffic_are_not_drift(settings):
    import random

    rng = random.Random(7)
    lengths = [int(rng.lognormvariate(4, 0.8)) + 1 for _ in range(400)]
    append(settings, window(200, 30, 10, prompt_len=lambda i: lengths[i])
           + window(200, 6, 0.1, prompt_len=lambda i: lengths[200 + i]))
    result = drift.check_drift(settings, log=False)
    prompt = next(f for f in result["features"] if f["name"] == "prompt_chars")
    assert prompt["bins"] == 3 and prompt["psi"] < 0.1
    assert result["status"] == "ok"


def test_ks_matches_scipy_on_known_samples():
    ref, recent = list(range(1, 11)), list(range(6, 16))
    stat, p_value = drift.ks(ref, recent)
    assert stat == pytest.approx(0.5)  # the empirical CDFs differ most (5/10) between 5 and 10
    expected = ks_2samp(ref, recent)
    assert (stat, p_value) == pytest.approx((expected.statistic, expected.pvalue))


def test_categorical_psi_sees_a_new_language():
    value, shares = drift.categorical_psi(["en"] * 90 + ["de"] * 10, ["en"] * 50 + ["fr"] * 50)
    eps = drift.EPSILON
    expected = (0.5 - 0.9) * math.log(0.5 / 0.9) + (eps - 0.1) * math.log(eps / 0.1) + (0.5 - eps) * math.log(0.5 / eps)
    assert value == pytest.approx(expected)
    assert shares["fr"] == {"reference": 0.0, "recent": 0.5}


def test_helpful_drop_z_test_matches_hand_value():
    result = drift.helpful_drop(80, 100, 60, 100, alpha=0.05)
    z = 0.2 / math.sqrt(0.7 * 0.3 * (1 / 100 + 1 / 100))
    assert result["test"] == "z_test"
    assert result["z"] == pytest.approx(z)
    assert result["p_value"] == pytest.approx(norm.sf(z))
    assert result["significant"] is True
    assert drift.helpful_drop(60, 100, 80, 100)["significant"] is False  # a rise is never concept drift


def test_helpful_drop_uses_fisher_for_small_counts():
    result = drift.helpful_drop(9, 10, 2, 5)
    assert result["test"] == "fisher_exact"
    assert result["p_value"] == pytest.approx(fisher_exact([[2, 3], [9, 1]], alternative="less")[1])


# --- check_drift on workspaces -------------------------------------------------------------------------------
def test_stable_traffic_gives_ok_and_exit_0(settings):
    append(settings, window(60, 30, 10, score=5) + window(60, 6, 0.1, score=5))
    result = drift.check_drift(settings, log=False)
    assert result["reference"]["kind"] == "before_recent"  # no champion yet
    assert (result["reference"]["n"], result["recent"]["n"]) == (60, 60)
    assert result["status"] == "ok"
    assert all(f["level"] == "ok" for f in result["features"])
    out = invoke("drift")
    assert out.exit_code == 0, out.output
    assert "drift: ok" in out.output


def test_longer_prompts_and_a_new_language_give_alert_and_exit_2(settings):
    append(settings, window(60, 30, 10) + window(60, 6, 0.1, prompt_len=lambda i: 400 + i, language="de"))
    out = invoke("drift", "--json")
    assert out.exit_code == 2, out.output
    result = orjson.loads(out.stdout)
    levels = {f["name"]: f for f in result["features"]}
    assert result["status"] == "alert"
    assert levels["prompt_chars"]["level"] == "alert" and levels["prompt_chars"]["ks_p"] < 1e-6
    assert levels["language"]["level"] == "alert"
    assert levels["answer_chars"]["level"] == "ok"  # the answers did not change
    events = [r for _, r in store.iter_jsonl(settings.learning_events) if r.get("event") == "drift"]
    assert events[-1]["status"] == "alert" and events[-1]["psi"]["prompt_chars"] > 0.25


def test_too_few_interactions_is_insufficient_and_exit_0(settings):
    append(settings, window(5, 30, 10) + window(5, 6, 0.1))
    out = invoke("drift")
    assert out.exit_code == 0, out.output
    assert "insufficient" in out.output and "too few interactions" in out.output


def test_a_drop_in_helpful_rate_is_concept_drift(settings):
    old = window(60, 30, 10, score=5, prompt_len=lambda i: 20 + i % 10)
    for i, t in enumerate(old):
        t.feedback = Feedback(score=5 if i % 10 else 1)  # 90% helpful
    new = window(60, 6, 0.1, prompt_len=lambda i: 20 + i % 10)
    append(settings, old + new)
    # the recent turns are rated later, as their own feedback events: 50% helpful
    append(settings, [FeedbackEvent(t.id, Feedback(score=5 if i % 2 else 1), created_at=at(0)).to_dict() for i,
                      t in enumerate(new)])
    result = drift.check_drift(settings, log=False)
    concept = result["concept"]
    assert (concept["reference_rated"], concept["reference_helpful"]) == (60, 54)
    assert (concept["recent_rated"], concept["recent_helpful"]) == (60, 30)
    assert concept["significant"] and concept["level"] == "alert"
    assert result["status"] == "alert"


def _champion_on(settings, trained_on: list[Interaction]) -> None:
    path = settings.curated_dir / "curated_1.jsonl"
    store.atomic_write_jsonl(path, [{"messages": t.messages, "source_ids": [t.id]} for t in trained_on])
    snapshot = {"id": "curated_1", "file": "data/curated/curated_1.jsonl", "sha256": "x"}
    registry.update(settings, lambda d: registry.add_snapshot(d, snapshot), "snapshot_created")
    entry = {"version": "1.0.0", "path": "adapters/1.0.0", "status": "champion", "snapshot": {"id": "curated_1"}}
    registry.update(settings, lambda d: {**registry.register_adapter(d, entry), "champion": "1.0.0"}, "promote")


def test_champion_reference_is_exactly_its_training_data(settings):
    trained = window(60, 30, 20, language="en")
    untrained = window(60, 19, 10, language="fr")  # older than the recent window, but not trained on
    recent = window(60, 6, 0.1, language="fr")
    append(settings, trained + untrained + recent)
    _champion_on(settings, trained)
    result = drift.check_drift(settings, log=False)
    assert result["reference"]["kind"] == "champion"
    assert result["reference"]["champion"] == "1.0.0" and result["reference"]["snapshots"] == ["curated_1"]
    assert result["reference"]["n"] == 60
    language = next(f for f in result["features"] if f["name"] == "language")
    assert language["shares"]["en"] == {"reference": 1.0, "recent": 0.0}
    assert result["status"] == "alert"
    # against the untrained French weeks there is no language drift
    by_range = drift.check_drift(settings, reference=f"{at(19)[:10]}..{at(10)[:10]}", log=False)
    assert by_range["reference"]["kind"] == "range"
    assert next(f for f in by_range["features"] if f["name"] == "language")["psi"] == pytest.approx(0.0)


def test_bad_reference_is_one_clear_line(settings):
    out = invoke("drift", "--reference", "last-week")
    assert out.exit_code == 2
    assert "neither 'champion' nor a range" in out.output and "Traceback" not in out.output
    out = invoke("drift", "--recent-days", "0")
    assert out.exit_code == 2 and "at least 1 day" in out.output


def test_champion_reference_follows_a_real_curated_snapshot(settings):
    from continuous_learning.curate import run_curate

    old = [turn(f"How do I calibrate sensor model S-{i} on line {i % 7}?", 30 - i * 0.2, score=5) for i in range(50)]
    append(settings, old)
    manifest = run_curate(settings, now=NOW - timedelta(days=10))
    assert manifest["status"] == "created"
    snap = registry.load(settings)["snapshots"][0]
    curated_ids = {s for key in ("file", "eval_file") for _, r in store.iter_jsonl(settings.home / snap[key])
                   for s in r["source_ids"]}
    entry = {"version": "1.0.0", "path": "adapters/1.0.0", "status": "champion", "snapshot": {"id": snap["id"]}}
    registry.update(settings, lambda d: {**registry.register_adapter(d, entry), "champion": "1.0.0"}, "promote")
    append(settings, [turn(f"Wie kalibriere ich Sensor S-{i}?", 5 - i * 0.1, language="de", score=5)
                      for i in range(40)])
    result = drift.check_drift(settings)
    assert result["reference"]["kind"] == "champion" and result["reference"]["snapshots"] == [snap["id"]]
    assert result["reference"]["n"] == len(curated_ids) >= 30
    assert result["status"] == "alert"
    assert result["concept"]["baseline"]["basis"].startswith("all rated turns")
    logged = [r for _, r in store.iter_jsonl(settings.learning_events) if r.get("event") == "drift"]
    assert logged[-1]["reference"] == "champion" and logged[-1]["n_reference"] == len(curated_ids)
