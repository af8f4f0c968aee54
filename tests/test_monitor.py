"""`cl status` and `cl report` on an empty and on a populated workspace (no model needed)."""
from __future__ import annotations

import base64
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import orjson
import pytest
from typer.testing import CliRunner

from continuous_learning import cli, registry
from continuous_learning.capture.ingest import update_feedback_counters
from continuous_learning.core.records import Feedback, FeedbackEvent, Interaction
from continuous_learning.core.settings import load_settings
from continuous_learning.monitor import status as monitor
from continuous_learning.monitor.report import write_report
from continuous_learning.storage import store

NOW = datetime.now(UTC)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def settings(tmp_path, monkeypatch):
    home = tmp_path / "ws"
    home.mkdir()
    monkeypatch.setenv("CL_HOME", str(home))
    monkeypatch.setenv("CL_USER_HASH_SALT", "test-salt")
    return load_settings()


def at(days_ago: float) -> str:
    return (NOW - timedelta(days=days_ago)).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def turn(days_ago: float, score: int | None, adapter: str | None, arm: str | None = None) -> Interaction:
    return Interaction(messages=[{"role": "user", "content": "How do I reset the pump?"},
                                 {"role": "assistant", "content": "Hold reset."}],
                       session_id="s", adapter_version=adapter, feedback=Feedback(score=score), ab_arm=arm,
                       latency_ms=50.0,
                       created_at=at(days_ago), recorded_at=at(days_ago))


def record(settings, interactions: list[Interaction]) -> None:
    """Append as the Recorder does: the log line, then the feedback counters."""
    store.append_jsonl(settings.raw_log, [i.to_dict() for i in interactions])
    update_feedback_counters(settings, [(None, i.feedback, i.adapter_version) for i in interactions])


def rate_later(settings, interaction: Interaction, score: int) -> None:
    feedback = Feedback(score=score)
    store.append_jsonl(settings.raw_log, [FeedbackEvent(interaction.id, feedback, created_at=at(0)).to_dict()])
    update_feedback_counters(settings, [(interaction.feedback, interaction.feedback.merged(feedback),
                                         interaction.adapter_version)])


def add_adapter(settings, version: str, status: str, accuracy: float, losses: list[float]) -> None:
    entry = {"version": version, "path": f"adapters/{version}", "status": status, "snapshot": {"id": "curated_1"},
             "metrics": {"final_loss": losses[-1]}}
    registry.update(settings, lambda d: registry.register_adapter(d, entry), "adapter_trained", version=version,
                    final_loss=losses[-1])
    store.atomic_write_jsonl(settings.adapters_dir / version / "metrics.jsonl",
                             [{"step": i + 1, "loss": loss, "lr": 1e-4, "tokens_per_s": 100.0} for i,
                              loss in enumerate(losses)])
    registry.record_eval_result(settings, version, {"accuracy": accuracy, "general_accuracy": 0.9})


@pytest.fixture
def populated(settings):
    """Base model: 4 turns (2 helpful of 3 rated); 1.0.0 (archived): 3 rated, 1 helpful; 1.1.0 (champion):
    5 turns, 4 rated (one rated later), 3 helpful; 1.2.0 candidate in an A/B test, 2 turns rated helpful."""
    base = [turn(10, 5, None), turn(10, 1, None), turn(9, 4, None), turn(9, None, None)]
    old = [turn(6, 5, "1.0.0"), turn(6, 2, "1.0.0"), turn(5, 1, "1.0.0")]
    champion = [turn(2, 5, "1.1.0", "champion"), turn(1, 5, "1.1.0", "champion"), turn(1, 3, "1.1.0", "champion"),
                turn(0, None, "1.1.0", "champion"), turn(0, None, "1.1.0")]
    candidate = [turn(1, 5, "1.2.0", "candidate"), turn(0, 4, "1.2.0", "candidate")]
    record(settings, base + old + champion + candidate)
    rate_later(settings, champion[3], 4)
    add_adapter(settings, "1.0.0", "candidate", 0.5, [2.0, 1.5, 1.2])
    add_adapter(settings, "1.1.0", "candidate", 0.75, [1.9, 1.1, 0.8, 0.6])
    add_adapter(settings, "1.2.0", "candidate", 0.8, [1.8, 1.0])
    registry.update(settings, lambda d: registry.promote(d, "1.0.0", "test"), "promote", reason="test",
                    **{"from": None, "to": "1.0.0"})
    registry.update(settings, lambda d: registry.promote(d, "1.1.0", "test"), "promote", reason="test",
                    **{"from": "1.0.0", "to": "1.1.0"})
    registry.log_event(settings, "drift", status="warn", worst_feature="prompt_chars")
    registry.log_event(settings, "cycle", ran=["curate", "drift"], failed=[], nothing_due=False)
    store.atomic_write_json(settings.adapters_dir / "ab_test.json",
                            {"id": "ab1", "candidate": "1.2.0", "champion": "1.1.0", "traffic": 0.2,
                             "started_at": at(3), "status": "running"})
    return {"base": base, "old": old, "champion": champion, "candidate": candidate}


def invoke(*args: str):
    return CliRunner().invoke(cli.app, list(args))


# --- pure helpers -----------------------------------------------------------------------------------------
def test_helpful_rate_counts_only_rated_turns():
    assert monitor.helpful_rate({"helpful": 3, "unhelpful": 1, "neutral": 1, "corrected": 1, "skipped": 10,
                                 "turns": 16}) == 0.5
    assert monitor.helpful_rate({"skipped": 4}) is None


def test_event_outcomes_read_like_sentences():
    assert monitor.event_outcome({"event": "promote", "from": None, "to": "1.0.0",
                                  "reason": "gate"}) == "base -> 1.0.0 (gate)"
    assert monitor.event_outcome({"event": "cycle", "nothing_due": True}) == "nothing due"
    assert monitor.event_outcome({"event": "ab_stop", "candidate": "1.2.0", "champion": "1.1.0",
                                  "promoted": True}) == "1.2.0 vs 1.1.0: candidate promoted"


# --- cl status ----------------------------------------------------------------------------------------------
def test_status_on_an_empty_workspace(settings):
    status = monitor.collect_status(settings)
    assert status["interactions"]["total"] == 0 and status["champion"] is None and status["adapters"] == []
    assert len(status["interactions"]["per_day"]) == 14
    assert status["drift"] is None and status["ab_test"] is None
    assert not (settings.home / "logs").exists()  # looking changes nothing
    out = invoke("status")
    assert out.exit_code == 0, out.output
    assert "0 in total" in out.output and "no adapters yet" in out.output


def test_status_on_a_populated_workspace(settings, populated):
    status = monitor.collect_status(settings)
    turns = status["interactions"]
    assert turns["total"] == 14
    assert turns["verdicts"] == {"helpful": 8, "unhelpful": 3, "neutral": 1, "corrected": 0, "unrated": 2}
    assert turns["rated"] == 12 and turns["helpful_rate"] == pytest.approx(8 / 12)
    assert turns["feedback_events"] == 1
    today = next(d for d in turns["per_day"] if d["day"] == NOW.date().isoformat())
    # the late rating counts on its turn's day
    assert today["turns"] == 3 and today["helpful"] == 2 and today["rated"] == 2
    assert sum(d["turns"] for d in turns["per_day"]) == 14

    assert status["champion"] == "1.1.0"
    by_version = {r["version"]: r for r in status["adapters"]}
    assert [r["version"] for r in status["adapters"]] == ["1.0.0", "1.1.0", "1.2.0"]
    assert by_version["1.0.0"]["status"] == "archived" and by_version["1.2.0"]["status"] == "candidate"
    assert by_version["1.1.0"]["eval_accuracy"] == 0.75 and by_version["1.1.0"]["final_loss"] == 0.6
    assert by_version["1.0.0"]["helpful_rate"] == pytest.approx(1 / 3)
    assert by_version["1.1.0"]["helpful_rate"] == pytest.approx(3 / 4) and by_version["1.1.0"]["rated"] == 4
    assert by_version["1.2.0"]["helpful_rate"] == 1.0
    assert status["base_helpful_rate"] == pytest.approx(2 / 3)

    latest = status["events"]["latest"]
    assert latest["promote"]["outcome"] == "1.0.0 -> 1.1.0 (test)"
    assert latest["eval"]["details"]["version"] == "1.2.0"
    assert latest["cycle"]["outcome"] == "ran curate, drift"
    assert status["drift"]["details"]["status"] == "warn"

    arms = status["ab_test"]["arms"]
    assert arms["champion"] == {"turns": 4, "rated": 4, "helpful": 3, "helpful_rate": 0.75}
    assert arms["candidate"]["turns"] == 2 and arms["candidate"]["helpful_rate"] == 1.0
    assert status["disk"]["data_raw"] == settings.raw_log.stat().st_size
    assert status["disk"]["adapters"] > 0 and status["disk"]["logs"] > 0


def test_status_json_parses_and_the_screen_shows_the_chart(settings, populated):
    out = invoke("status", "--json")
    assert out.exit_code == 0, out.output
    data = orjson.loads(out.stdout)
    assert data["interactions"]["total"] == 14 and data["ab_test"]["candidate"] == "1.2.0"
    screen = invoke("status")
    assert screen.exit_code == 0, screen.output
    assert "helpful rate of rated turns, per day" in screen.output  # the plotext chart
    assert "1.1.0" in screen.output and "A/B test ab1: running" in screen.output
    assert "drift: warn" in screen.output


def test_status_survives_damaged_side_files(settings, populated):
    settings.feedback_metrics.write_text("{not json")
    status = monitor.collect_status(settings)
    assert status["interactions"]["total"] == 14
    assert any("feedback_metrics.json" in note for note in status["notes"])


def test_status_does_not_import_torch(settings, populated):
    code = ("import sys; from continuous_learning.cli import main\n"
            "try: main(['status', '--json'])\nexcept SystemExit: pass\nprint('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**__import__("os").environ}, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"


# --- cl report ------------------------------------------------------------------------------------------------
def _pngs_in_html(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)]


def test_report_writes_html_markdown_and_pngs(settings, populated):
    out = invoke("report")
    assert out.exit_code == 0, out.output
    html_path = next(settings.logs_dir.glob("reports/report_*.html"))
    md_path = html_path.with_suffix(".md")
    assert str(html_path) in out.output.replace("\n", "")
    page, markdown = html_path.read_text(), md_path.read_text()
    for section in ("Summary", "Adapters and evaluation", "Training loss", "Helpful rate over time", "Drift",
                    "Recent events"):
        assert f"<h2>{section}</h2>" in page and f"## {section}" in markdown
    embedded = _pngs_in_html(page)
    assert len(embedded) == 3  # eval accuracy, loss curves, helpful rate; too little traffic for drift figures
    assert all(png.startswith(PNG_MAGIC) for png in embedded)
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", markdown)
    assert len(linked) == 3
    for name in linked:
        assert (md_path.parent / name).read_bytes() in embedded
    assert "<td>1.1.0</td>" in page and "75%" in page
    assert "too few interactions for a verdict" in markdown


def test_report_has_drift_figures_when_there_is_traffic(settings):
    turns = [Interaction(messages=[{"role": "user", "content": "x" * (20 + i % 10)},
                                   {"role": "assistant", "content": "ok"}],
                         session_id="s", language="en", created_at=at(days), recorded_at=at(days))
             for i, days in enumerate([20 - i * 0.2 for i in range(40)] + [5 - i * 0.1 for i in range(40)])]
    store.append_jsonl(settings.raw_log, [t.to_dict() for t in turns])
    result = write_report(settings)
    names = [p.name for p in result["charts"]]
    assert any(n.endswith("_drift_psi.png") for n in names)
    assert all(p.read_bytes().startswith(PNG_MAGIC) for p in result["charts"])
    assert "prompt_chars" in result["markdown"].read_text()


def test_report_on_an_empty_workspace_says_what_is_missing(settings):
    result = write_report(settings)
    assert result["charts"] == []
    text = result["markdown"].read_text()
    assert "No adapter has been trained yet" in text and "No learning events yet." in text
    assert result["html"].read_text().startswith("<!DOCTYPE html>")
    assert len(result["missing"]) == 4
