"""`cl cycle` (due rules, idempotence, the lock, reports, events) and `cl schedule` (crontab, systemd timers)."""
from __future__ import annotations

import os
import shutil
import stat
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest
from test_ab import events, fake_adapter, invoke, record

import continuous_learning
from continuous_learning import registry
from continuous_learning.core.errors import ConfigError, InputError
from continuous_learning.core.settings import CycleConfig, load_settings
from continuous_learning.loop import cycle, schedule
from continuous_learning.monitor import ab
from continuous_learning.storage.store import workspace_lock

DEMO_DATA = Path(continuous_learning.__file__).parent / "data"


# --- pure parts -----------------------------------------------------------------------------------------------
def test_parse_steps_orders_and_validates():
    assert cycle.parse_steps(None) == cycle.STEPS
    assert cycle.parse_steps("health, curate") == ("curate", "health")
    with pytest.raises(InputError, match="unknown cycle step.*bogus"):
        cycle.parse_steps("curate,bogus")


def test_due_rules():
    assert cycle.curate_due(10, 10).due and not cycle.curate_due(9, 10).due
    assert cycle.train_due("s1", None, False).due
    assert not cycle.train_due("s1", "s1", False).due  # failed before: a human looks first
    assert cycle.train_due(None, None, True).due and not cycle.train_due(None, None, False).due
    now = datetime(2026, 11, 23, tzinfo=UTC)
    assert cycle.eval_due(None, 30, now, "x").due
    assert cycle.eval_due(now - timedelta(days=31), 30, now, "x").due
    assert not cycle.eval_due(now - timedelta(days=3), 30, now, "x").due
    seen = {"log": [10, 5], "champion": "1.0.0"}
    assert cycle.watch_due("drift", None, [10, 5], "1.0.0", "drift").due
    assert not cycle.watch_due("drift", seen, [10, 5], "1.0.0", "drift").due
    assert cycle.watch_due("drift", seen, [20, 6], "1.0.0", "drift").due
    assert cycle.watch_due("drift", seen, [10, 5], "1.1.0",
                           "drift").reason == "the champion changed since the last check"


def test_untrained_snapshot_is_the_newest_without_adapter():
    doc = registry.empty_registry()
    assert cycle.untrained_snapshot(doc) is None
    doc["snapshots"] = [{"id": "a"}, {"id": "b"}]
    assert cycle.untrained_snapshot(doc) == "b"
    doc["adapters"]["1.0.0"] = {"status": "candidate", "snapshot": {"id": "b"}}
    assert cycle.untrained_snapshot(doc) is None


def test_report_rendering():
    outcomes = [cycle.Outcome("curate", "ran", "12 new", "snapshot x"),
                cycle.Outcome("drift", "failed", "new | turns", "boom")]
    text = cycle.render_report("2026-11-23T10:00:00.000Z", outcomes)
    assert text.startswith("# Cycle 2026-11-23T10:00:00.000Z")
    assert "| curate | ran | 12 new | snapshot x | 0.0 |" in text
    assert "new \\| turns" in text and "Failed: drift." in text


# --- running cycles ---------------------------------------------------------------------------------------------
@pytest.fixture
def demo_workspace(workspace, monkeypatch):
    monkeypatch.setenv("CL_TRAIN_MAX_STEPS", "3")
    monkeypatch.setenv("CL_TRAIN_MAX_SEQ_LEN", "96")
    monkeypatch.setenv("CL_EVAL_MAX_NEW_TOKENS", "4")
    monkeypatch.setenv("CL_CURATE_DOMAIN_CAP", "1.0")
    (workspace / "eval").mkdir()
    shutil.copyfile(DEMO_DATA / "demo_eval.jsonl", workspace / "eval" / "qa_eval.jsonl")
    assert invoke("ingest", str(DEMO_DATA / "demo_interactions.jsonl")).exit_code == 0
    return workspace


def reports(home: Path) -> list[Path]:
    folder = home / "logs" / "reports"
    return sorted(folder.glob("cycle_*.md")) if folder.exists() else []


def test_empty_workspace_has_nothing_due(settings):
    out = invoke("cycle")
    assert out.exit_code == 0, out.output
    assert out.output.startswith("nothing due: curate: 0 new rated interaction(s)")
    assert reports(settings.home) == []
    (event,) = events(settings, "cycle")
    assert event["nothing_due"] is True and event["ran"] == [] and event["report"] is None


def test_curate_then_nothing_new(demo_workspace):
    settings = load_settings()
    dry = invoke("cycle", "--only", "curate,train", "--dry-run")
    assert dry.exit_code == 0
    assert "curate  due      30 new rated interaction(s)" in dry.output and "after curate" in dry.output
    assert registry.load(settings)["snapshots"] == [] and events(settings, "cycle") == []

    out = invoke("cycle", "--only", "curate", "--json")
    assert out.exit_code == 0, out.output
    result = orjson.loads(out.output)
    (curated,) = result["outcomes"]
    assert curated["status"] == "ran" and curated["details"]["status"] == "created"
    snapshot = registry.load(settings)["snapshots"][-1]["id"]
    assert curated["details"]["snapshot"] == snapshot
    (report,) = reports(settings.home)
    assert str(report) == result["report"] and f"snapshot {snapshot}" in report.read_text()
    (event,) = events(settings, "cycle")
    assert event["ran"] == ["curate"] and event["outcomes"]["curate"]["status"] == "ran"

    again = invoke("cycle", "--only", "curate")
    assert again.exit_code == 0 and again.output.startswith("nothing due: curate: 0 new rated")
    assert len(registry.load(settings)["snapshots"]) == 1 and len(reports(settings.home)) == 1


def test_full_cycle_trains_evaluates_and_is_idempotent(demo_workspace):
    settings = load_settings()
    out = invoke("cycle", "--json")
    assert out.exit_code == 0, out.output
    result = orjson.loads(out.output)
    by_step = {o["step"]: o for o in result["outcomes"]}
    assert by_step["curate"]["status"] == "ran" and by_step["train"]["status"] == "ran"
    version = by_step["train"]["details"]["version"]
    doc = registry.load(settings)
    assert doc["adapters"][version]["snapshot"]["id"] == doc["snapshots"][-1]["id"]
    assert doc["adapters"][version]["evals"]  # evaluated by the gate
    assert by_step["drift"]["status"] == "ran" and by_step["ab"]["status"] == "skipped"
    assert {e["event"] for e in events(settings)} >= {"snapshot_created", "adapter_trained", "eval", "drift", "cycle"}
    second = orjson.loads(invoke("cycle", "--json").output)
    assert second["nothing_due"] is True, second
    assert len(registry.load(settings)["adapters"]) == 1


def test_ab_and_health_steps_run_when_new_turns_arrive(settings):
    fake_adapter(settings, "1.0.0")
    fake_adapter(settings, "1.1.0")
    registry.promote_version(settings, "1.0.0", "first", forced=True)
    ab.start_test(settings, "1.1.0", traffic=0.5)
    record(settings, "1.0.0", helpful=3, unhelpful=2, arm="champion")
    first = cycle.run_cycle(settings, ("ab", "health"))
    by_step = {o["step"]: o for o in first["outcomes"]}
    assert by_step["ab"]["status"] == "ran" and "1.1.0 - of 0 vs 1.0.0 60% of 5" in by_step["ab"]["summary"]
    assert by_step["health"]["status"] == "ran" and by_step["health"]["details"]["verdict"] == "insufficient"
    assert cycle.run_cycle(settings, ("ab", "health"))["nothing_due"] is True
    record(settings, "1.1.0", helpful=1, unhelpful=0, arm="candidate")
    assert [o["step"] for o in cycle.run_cycle(settings, ("ab", "health"))["outcomes"]
            if o["status"] == "ran"] == ["ab", "health"]
    assert ab.running_test(settings) is not None  # cycle.ab_promote is off: the test keeps running


def test_a_second_cycle_while_one_runs_exits_quietly(settings):
    with workspace_lock(settings.lock_dir, "cycle"):
        out = invoke("cycle")
    assert out.exit_code == 0
    assert f"a cycle is already running (pid {os.getpid()})" in out.output
    assert events(settings, "cycle") == []


def test_failed_step_is_reported_and_exits_1(settings):
    (settings.home / "data" / "ingestion").mkdir(parents=True)
    settings.raw_log.write_text('{"type": "interaction", "id": "x", "messages": [], "session_id": "s"}\n')
    fake_adapter(settings, "1.0.0")
    registry.promote_version(settings, "1.0.0", "first", forced=True)
    (settings.home / "eval").mkdir()
    (settings.home / "eval" / "qa_eval.jsonl").write_text("this is not JSON\n")
    out = invoke("cycle", "--only", "eval")
    assert out.exit_code == 1
    assert "eval    failed" in out.output
    (event,) = events(settings, "cycle")
    assert event["failed"] == ["eval"]


# --- schedule: pure rendering -------------------------------------------------------------------------------------
def test_cron_to_oncalendar():
    assert schedule.cron_to_oncalendar("0 3 * * *") == "*-*-* 03:00:00"
    assert schedule.cron_to_oncalendar("0 4 * * 0") == "Sun *-*-* 04:00:00"
    assert schedule.cron_to_oncalendar("0 5 1 * *") == "*-*-01 05:00:00"
    assert schedule.cron_to_oncalendar("*/15 9-11 * 1,7 1-5") == "Mon,Tue,Wed,Thu,Fri *-01,07-* 09,10,11:00,15,30,45:00"
    assert schedule.cron_to_oncalendar("30 2 * * 7") == "Sun *-*-* 02:30:00"
    with pytest.raises(ConfigError, match="both day of month and day of week"):
        schedule.cron_to_oncalendar("0 3 1 * 1")
    for bad in ("0 3 * *", "61 3 * * *", "x 3 * * *", "0 3 * 13 *"):
        with pytest.raises(ConfigError):
            schedule.parse_cron(bad)


def test_cron_block_rendering(tmp_path):
    home = tmp_path / "my ws"
    block = schedule.render_cron_block(home, ["/opt/venv/bin/cl", "--home", str(home)], CycleConfig())
    lines = block.splitlines()
    assert lines[0] == f"# >>> cl schedule {home} >>>" and lines[-1] == f"# <<< cl schedule {home} <<<"
    log = f"'{home}/logs/cycle_cron.log'"
    assert f"0 3 * * * /opt/venv/bin/cl --home '{home}' cycle --only curate,drift,ab,health >> {log} 2>&1" in lines
    assert f"0 4 * * 0 /opt/venv/bin/cl --home '{home}' cycle --only train >> {log} 2>&1" in lines
    assert f"0 5 1 * * /opt/venv/bin/cl --home '{home}' cycle --only eval >> {log} 2>&1" in lines
    mine = "MAILTO=me\n5 * * * * backup.sh\n"
    merged = schedule.merge_crontab(mine, block, home)
    assert merged == mine + block
    assert schedule.merge_crontab(merged, block, home) == merged  # re-install replaces, never duplicates
    assert schedule.strip_block(merged, home) == (mine, True)
    assert schedule.strip_block(mine, home) == (mine, False)
    percent = schedule.render_cron_block(tmp_path / "50%", ["cl"], CycleConfig())
    assert "50\\%" in percent and "50%/" not in percent.replace("50\\%", "")


def test_systemd_unit_rendering(tmp_path):
    units = schedule.render_units(tmp_path, ["/opt/venv/bin/cl", "--home", str(tmp_path)], CycleConfig())
    prefix = schedule.unit_prefix(tmp_path)
    assert sorted(units) == sorted(f"{prefix}-{job}.{kind}" for job in ("daily", "weekly", "monthly")
                                   for kind in ("service", "timer"))
    service = units[f"{prefix}-weekly.service"]
    assert f"ExecStart=/opt/venv/bin/cl --home {tmp_path} cycle --only train" in service and "Type=oneshot" in service
    timer = units[f"{prefix}-weekly.timer"]
    assert "OnCalendar=Sun *-*-* 04:00:00" in timer and "Persistent=true" in timer and "WantedBy=timers.target" in timer
    assert f"Unit={prefix}-weekly.service" in timer


# --- schedule: against a fake crontab and a tmp HOME ---------------------------------------------------------------
def fake_tool(bin_dir: Path, name: str, script: str) -> None:
    path = bin_dir / name
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def fake_bin(tmp_path, monkeypatch):
    """A `crontab` that keeps its table in a file, and a `systemctl` that logs its arguments, first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    table, calls = tmp_path / "crontab.txt", tmp_path / "systemctl.log"
    fake_tool(bin_dir, "crontab", f"""case "$1" in
  -l) if [ -f '{table}' ]; then cat '{table}'; else echo 'no crontab for tester' >&2; exit 1; fi ;;
  -) cat > '{table}' ;;
esac""")
    fake_tool(bin_dir, "systemctl", f"echo \"$@\" >> '{calls}'")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    return table, calls


def test_crontab_install_show_remove_keeps_other_lines(settings, fake_bin):
    table, _ = fake_bin
    assert invoke("schedule", "show").output.count("nothing installed") == 1
    table.write_text("MAILTO=me\n5 * * * * backup.sh\n")
    out = invoke("schedule", "install")
    assert out.exit_code == 0, out.output
    text = table.read_text()
    assert text.startswith("MAILTO=me\n5 * * * * backup.sh\n# >>> cl schedule")
    assert f"--home {settings.home} cycle --only curate,drift,ab,health" in text
    assert (settings.home / "logs").is_dir()
    command = [w for w in text.splitlines()[4].split(" >> ")[0].split()[5:] if not w.startswith("CL_")]  # past env
    assert Path(command[0]).is_absolute() and command[0].startswith(str(Path(sys.executable).parent))
    assert invoke("schedule", "install").exit_code == 0
    assert table.read_text() == text  # idempotent
    shown = invoke("schedule", "show")
    assert "cycle --only train" in shown.output and "0 4 * * 0" in shown.output
    removed = invoke("schedule", "remove")
    assert removed.exit_code == 0 and "removed" in removed.output
    assert table.read_text() == "MAILTO=me\n5 * * * * backup.sh\n"
    assert "nothing installed" in invoke("schedule", "remove").output


def test_crontab_install_on_an_empty_crontab(settings, fake_bin):
    table, _ = fake_bin
    assert invoke("schedule", "install").exit_code == 0
    assert table.read_text().startswith("# >>> cl schedule")
    assert invoke("schedule", "remove").exit_code == 0 and table.read_text() == ""


def test_systemd_install_show_remove(settings, fake_bin, tmp_path):
    _, calls = fake_bin
    out = invoke("schedule", "install", "--systemd")
    assert out.exit_code == 0, out.output
    unit_dir = tmp_path / "home" / ".config" / "systemd" / "user"
    prefix = schedule.unit_prefix(settings.home)
    assert sorted(p.name for p in unit_dir.iterdir()) == sorted(
        f"{prefix}-{job}.{kind}" for job in ("daily", "weekly", "monthly") for kind in ("service", "timer"))
    (unit_dir / "someone-else.timer").write_text("[Timer]\n")
    log = calls.read_text().splitlines()
    assert log[0] == "--user daemon-reload"
    assert log[1].startswith("--user enable --now") and f"{prefix}-daily.timer" in log[1]
    shown = invoke("schedule", "show")
    assert f"{prefix}-monthly.timer OnCalendar=*-*-01 05:00:00" in shown.output
    assert invoke("schedule", "remove", "--systemd").exit_code == 0
    assert [p.name for p in unit_dir.iterdir()] == ["someone-else.timer"]
    assert calls.read_text().splitlines()[2].startswith("--user disable --now")


def test_missing_crontab_is_one_clear_line(settings, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    out = invoke("schedule", "install")
    assert out.exit_code == 1 and "'crontab' command is not installed" in out.output and "--systemd" in out.output


def test_cycle_promotes_an_ab_winner_only_when_configured(settings, monkeypatch):
    fake_adapter(settings, "1.0.0")
    fake_adapter(settings, "1.1.0")
    registry.promote_version(settings, "1.0.0", "first", forced=True)
    test = ab.start_test(settings, "1.1.0", traffic=0.5)
    record(settings, "1.0.0", helpful=15, unhelpful=20, arm="champion")
    record(settings, "1.1.0", helpful=30, unhelpful=5, arm="candidate")
    first = cycle.run_cycle(settings, ("ab",))
    assert "promotion criteria hold" in first["outcomes"][0]["summary"]
    assert registry.load(settings)["champion"] == "1.0.0"
    monkeypatch.setenv("CL_CYCLE_AB_PROMOTE", "true")
    record(settings, "1.1.0", helpful=1, unhelpful=0, arm="candidate")
    second = cycle.run_cycle(load_settings(), ("ab",))
    assert second["outcomes"][0]["details"]["promoted"] is True
    assert registry.load(settings)["champion"] == "1.1.0" and ab.load_test(settings)["status"] == "stopped"
    assert ab.load_test(settings)["id"] == test["id"]
