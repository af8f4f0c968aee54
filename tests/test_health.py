"""Champion health: the pure verdict, and a simulated degradation that rolls the registry back."""
from __future__ import annotations

import orjson
import pytest
from test_ab import events, fake_adapter, invoke, record

from continuous_learning import registry
from continuous_learning.core.settings import HealthConfig
from continuous_learning.monitor.ab import Tally, two_proportion_z
from continuous_learning.monitor.health import DEGRADED, INSUFFICIENT, OK, check_health, health_decision

CONFIG = HealthConfig(auto_rollback=True, min_samples=30, degradation_factor=0.8, alpha=0.05)


def test_decision_degraded_when_worse_by_factor_and_significant():
    out = health_decision(Tally(40, 12), Tally(40, 32), CONFIG)  # 30% vs 80%
    _, p = two_proportion_z(12, 40, 32, 40, alternative="less")
    assert out["verdict"] == DEGRADED and out["p_value"] == pytest.approx(p) and p < 0.001
    assert out["champion_stats"] == {"rated": 40, "helpful": 12, "helpful_rate": 0.3}
    assert "below 0.8 x = 64.0%" in out["reasons"][0]


def test_decision_ok_when_within_factor_even_if_significant():
    out = health_decision(Tally(2000, 1400), Tally(2000, 1600), CONFIG)  # 70% vs 80%: significant, but 70% >= 64%
    assert out["verdict"] == OK and out["p_value"] < 0.05 and "not below" in out["reasons"][0]


def test_decision_ok_when_not_significant():
    out = health_decision(Tally(30, 14), Tally(30, 19), HealthConfig(degradation_factor=0.8))  # 47% < 51%, p ~ 0.1
    assert out["verdict"] == OK and out["p_value"] > 0.05 and "not significant" in out["reasons"][1]


def test_decision_insufficient_below_min_samples():
    out = health_decision(Tally(29, 0), Tally(100, 90), CONFIG)
    assert out["verdict"] == INSUFFICIENT and out["reasons"] == ["champion has 29 rated turn(s), needs 30"]


@pytest.fixture
def promoted_twice(settings):
    fake_adapter(settings, "1.0.0")
    fake_adapter(settings, "1.1.0")
    registry.promote_version(settings, "1.0.0", "first", forced=True)
    record(settings, "1.0.0", helpful=32, unhelpful=8)  # 80% helpful while it was champion
    registry.promote_version(settings, "1.1.0", "gate", forced=False)
    return settings


def test_simulated_degradation_rolls_back(promoted_twice):
    settings = promoted_twice
    record(settings, "1.1.0", helpful=12, unhelpful=28, late=True)  # 30%, ratings arriving as feedback events
    report = check_health(settings)
    assert report["verdict"] == DEGRADED and report["rolled_back"] is True
    assert report["champion"] == "1.1.0" and report["predecessor"] == "1.0.0"
    doc = registry.load(settings)
    assert doc["champion"] == "1.0.0" and doc["adapters"]["1.1.0"]["status"] == "archived"
    assert doc["history"][-1]["action"] == "rollback" and doc["history"][-1]["reason"].startswith("health: 1.1.0 "
                                                                                                  "degraded")
    (rolled,) = events(settings, "health_rollback")
    assert rolled["from"] == "1.1.0" and rolled["to"] == "1.0.0"
    assert rolled["champion_rated"] == 40 and rolled["champion_rate"] == pytest.approx(0.3)
    assert rolled["predecessor_rated"] == 40 and rolled["predecessor_rate"] == pytest.approx(0.8)
    assert rolled["p_value"] < 0.05
    (check,) = events(settings, "health_check")
    assert check["verdict"] == DEGRADED and check["rolled_back"] is True
    # the restored champion is judged against ITS predecessor (the base model, with no rated turns): no second rollback
    again = check_health(settings)
    assert again["verdict"] == INSUFFICIENT and again["predecessor"] is None and not again["rolled_back"]
    assert registry.load(settings)["champion"] == "1.0.0"


def test_small_sample_does_not_roll_back(promoted_twice):
    record(promoted_twice, "1.1.0", helpful=2, unhelpful=18)
    report = check_health(promoted_twice)
    assert report["verdict"] == INSUFFICIENT and not report["rolled_back"]
    assert registry.load(promoted_twice)["champion"] == "1.1.0"
    assert events(promoted_twice, "health_rollback") == []


def test_non_significant_drop_does_not_roll_back(promoted_twice):
    record(promoted_twice, "1.1.0", helpful=28, unhelpful=12)  # 70% vs 80%: within the factor, not significant
    report = check_health(promoted_twice)
    assert report["verdict"] == OK and not report["rolled_back"]
    assert registry.load(promoted_twice)["champion"] == "1.1.0"


def test_auto_rollback_off_only_reports(promoted_twice, monkeypatch):
    from continuous_learning.core.settings import load_settings

    monkeypatch.setenv("CL_HEALTH_AUTO_ROLLBACK", "false")
    record(promoted_twice, "1.1.0", helpful=12, unhelpful=28)
    report = check_health(load_settings())
    assert report["verdict"] == DEGRADED and not report["rolled_back"]
    assert "auto-rollback is off" in report["reasons"][-1]
    assert registry.load(promoted_twice)["champion"] == "1.1.0"


def test_cli_health_check_only_then_rollback(promoted_twice):
    record(promoted_twice, "1.1.0", helpful=12, unhelpful=28)
    looked = invoke("health", "--check-only", "--json")
    assert looked.exit_code == 0, looked.output
    assert orjson.loads(looked.output)["verdict"] == DEGRADED and registry.load(promoted_twice)["champion"] == "1.1.0"
    out = invoke("health")
    assert out.exit_code == 0, out.output
    assert "champion 1.1.0: 40 rated, helpful 30.0%" in out.output and "rolled back" in out.output
    assert registry.load(promoted_twice)["champion"] == "1.0.0"


def test_no_champion_is_nothing_to_judge(settings):
    out = invoke("health")
    assert out.exit_code == 0 and "nothing to judge" in out.output


def test_unusable_predecessor_is_not_a_rollback_target(promoted_twice):
    registry.update(promoted_twice, lambda d: d["adapters"]["1.0.0"].update(status="tainted") or d, "forget")
    record(promoted_twice, "1.1.0", helpful=12, unhelpful=28)
    report = check_health(promoted_twice)
    assert report["verdict"] == DEGRADED and not report["rolled_back"] and "1.0.0 is tainted" in report["reasons"][-1]
    assert registry.load(promoted_twice)["champion"] == "1.1.0"
