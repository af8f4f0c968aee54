"""Privacy rights: `cl forget`, `cl retention`, `cl export` (no model needed)."""
from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest
from typer.testing import CliRunner

from continuous_learning import cli, registry
from continuous_learning.capture.gdpr import apply_retention, export_user, forget_user
from continuous_learning.capture.privacy import hash_user_id
from continuous_learning.core.errors import RegistryError
from continuous_learning.core.records import Feedback, FeedbackEvent, Interaction
from continuous_learning.core.settings import load_settings
from continuous_learning.curate import run_curate
from continuous_learning.storage import store

SALT = "test-salt"
NOW = datetime.now(UTC)


@pytest.fixture
def settings(tmp_path, monkeypatch):
    """A bare workspace: these tests never load a model."""
    home = tmp_path / "ws"
    home.mkdir()
    monkeypatch.setenv("CL_HOME", str(home))
    monkeypatch.setenv("CL_USER_HASH_SALT", SALT)
    return load_settings()


def h(user: str) -> str:
    return hash_user_id(user, SALT.encode())


def at(days_ago: float) -> str:
    return (NOW - timedelta(days=days_ago)).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def turn(user: str, prompt: str, answer: str, days_ago: float = 0.0) -> Interaction:
    return Interaction(messages=[{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
                       session_id=f"s-{user}", user_hash=h(user), feedback=Feedback(score=5),
                       created_at=at(days_ago), recorded_at=at(days_ago))


def rating(target: Interaction, user: str, days_ago: float = 0.0) -> dict:
    return FeedbackEvent(target.id, Feedback(score=5), user_hash=h(user), created_at=at(days_ago)).to_dict()


def append(settings, *records) -> None:
    store.append_jsonl(settings.raw_log, [r.to_dict() if isinstance(r, Interaction) else r for r in records])


def raw_lines(settings) -> list[dict]:
    return [r for _, r in store.iter_jsonl(settings.raw_log)]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def populated(settings):
    """alice and bob chat; bob rates one of alice's answers; both land in one snapshot; two adapters."""
    alice = [turn("alice", f"What is part number PN-{i}?", f"Part PN-{i} is a bolt of size {i}.") for i in range(6)]
    bob = [turn("bob", f"Where is warehouse {c}?", f"Warehouse {c} is in hall {c}.") for c in "ABCDEF"]
    append(settings, *alice, *bob, rating(alice[0], "bob"), rating(bob[0], "alice"))
    manifest = run_curate(settings, now=NOW)
    assert manifest["status"] == "created"
    snap = registry.load(settings)["snapshots"][0]
    for version, users in (("1.0.0", [h("bob")]), ("1.1.0", [h("alice"), h("bob")])):
        entry = {"version": version, "path": f"adapters/{version}", "status": "candidate", "user_hashes": users,
                 "snapshot": {"id": snap["id"], "sha256": snap["sha256"]}}
        registry.update(settings, lambda d, e=entry: registry.register_adapter(d, e), "registered")
    doc = registry.load(settings)
    doc["adapters"]["1.0.0"]["status"] = "archived"
    doc["adapters"]["1.1.0"]["status"] = "champion"
    doc["champion"] = "1.1.0"
    doc["history"] = [{"action": "promote", "from": None, "to": "1.0.0", "at": at(1), "reason": "t"},
                      {"action": "promote", "from": "1.0.0", "to": "1.1.0", "at": at(0), "reason": "t"}]
    store.atomic_write_json(settings.registry_file, doc)
    return {"alice": alice, "bob": bob, "snapshot": snap["id"]}


def snapshot_records(settings, snap: dict) -> list[dict]:
    return [r for key in ("file", "eval_file") for _, r in store.iter_jsonl(settings.home / snap[key])]


def test_forget_removes_every_trace_and_keeps_others(settings, populated):
    bob_lines_before = [r for r in raw_lines(settings) if r.get("user_hash") == h("bob") and r["type"] == "interaction"]
    report = forget_user(settings, "alice")

    assert (report.interactions, report.feedback_events) == (6, 2)  # her rating of bob + bob's rating of her turn
    # bob's turn that alice rated carries her hash too: dropped whole
    assert report.snapshot_examples == 7 and report.snapshots == [populated["snapshot"]]
    raw = settings.raw_log.read_text()
    assert h("alice") not in raw and not any(i.id in raw for i in populated["alice"])
    assert [r for r in raw_lines(settings) if r["type"] == "interaction"] == bob_lines_before
    doc = registry.load(settings)
    snap = doc["snapshots"][0]
    records = snapshot_records(settings, snap)
    assert records and all(h("alice") not in r["user_hashes"] for r in records)
    assert sum(1 for r in records if h("bob") in r["user_hashes"]) == 5
    assert snap["sha256"] == sha(settings.home / snap["file"])
    assert snap["eval_sha256"] == sha(settings.home / snap["eval_file"])
    assert snap["user_hashes"] == [h("bob")]
    assert snap["counts"]["train"] + snap["counts"]["eval"] == len(records)
    manifest = orjson.loads((settings.home / snap["manifest"]).read_bytes())
    assert manifest["sha256"] == {"train": snap["sha256"], "eval": snap["eval_sha256"]}
    assert manifest["user_hashes"] == [h("bob")]


def test_forget_taints_adapters_and_moves_the_champion(settings, populated):
    report = forget_user(settings, "alice")
    doc = registry.load(settings)
    # 1.0.0 was trained on the same snapshot, which held alice's examples: tainted too, so back to base
    assert sorted(report.adapters_tainted) == ["1.0.0", "1.1.0"]
    assert {v: e["status"] for v, e in doc["adapters"].items()} == {"1.0.0": "tainted", "1.1.0": "tainted"}
    assert doc["champion"] is None
    assert doc["history"][-1]["action"] == "forget" and doc["history"][-1]["from"] == "1.1.0"


def test_champion_falls_back_to_nearest_untainted_ancestor(settings):
    doc = registry.empty_registry()
    for version, users in (("1.0.0", ["x"]), ("1.1.0", ["y"]), ("1.2.0", ["alice-hash"])):
        registry.register_adapter(doc, {"version": version, "path": f"adapters/{version}", "status": "archived",
                                        "user_hashes": users})
    doc["adapters"]["1.2.0"]["status"] = "champion"
    doc["champion"] = "1.2.0"
    doc["history"] = [{"action": "promote", "from": a, "to": b, "at": at(0), "reason": "t"}
                      for a, b in ((None, "1.0.0"), ("1.0.0", "1.1.0"), ("1.1.0", "1.2.0"))]
    from continuous_learning.capture.gdpr import retire_tainted_champion, taint_adapters

    assert taint_adapters(doc, "alice-hash", set()) == ["1.2.0"]
    move = retire_tainted_champion(doc)
    assert move["to"] == "1.1.0" and doc["champion"] == "1.1.0" and doc["adapters"]["1.1.0"]["status"] == "champion"


def test_forget_event_has_no_raw_id_and_rerun_is_idempotent(settings, populated):
    forget_user(settings, "alice")
    events = settings.learning_events.read_text()
    forget_events = [r for _, r in store.iter_jsonl(settings.learning_events) if r.get("event") == "forget"]
    assert len(forget_events) == 1 and forget_events[0]["interactions"] == 6
    assert "alice" not in events and h("alice") not in events
    registry_before = settings.registry_file.read_bytes()
    again = forget_user(settings, "alice")
    assert again.found_nothing and settings.registry_file.read_bytes() == registry_before


def test_rerun_finishes_after_a_crash_before_the_registry_update(settings, populated, monkeypatch):
    from continuous_learning.capture import gdpr

    monkeypatch.setattr(gdpr, "atomic_write_json", _crash_on_registry(settings, gdpr.atomic_write_json))
    with pytest.raises(KeyboardInterrupt):
        forget_user(settings, "alice")
    stale = registry.load(settings)["snapshots"][0]
    assert stale["sha256"] != sha(settings.home / stale["file"])  # files rewritten, registry not yet
    monkeypatch.undo()
    monkeypatch.setenv("CL_HOME", str(settings.home))
    monkeypatch.setenv("CL_USER_HASH_SALT", SALT)
    forget_user(settings, "alice")
    snap = registry.load(settings)["snapshots"][0]
    assert snap["sha256"] == sha(settings.home / snap["file"]) and h("alice") not in snap["user_hashes"]
    assert registry.load(settings)["champion"] is None


def _crash_on_registry(settings, real):
    def write(path, data):
        if path == settings.registry_file:
            raise KeyboardInterrupt  # stands in for a kill between the file rewrites and the registry write
        return real(path, data)

    return write


def test_forget_unknown_user_is_a_clean_no_op(settings, populated):
    before = {p: p.read_bytes() for p in settings.home.rglob("*") if p.is_file() and ".cl" not in p.parts}
    result = CliRunner().invoke(cli.app, ["forget", "--user", "nobody", "--yes"])
    assert result.exit_code == 0 and "nothing stored for this user" in result.output
    after = {p: p.read_bytes() for p in settings.home.rglob("*") if p.is_file() and ".cl" not in p.parts}
    assert after == before


def test_forget_cli_prints_counts(settings, populated):
    result = CliRunner().invoke(cli.app, ["forget", "--user", "alice", "--yes"])
    assert result.exit_code == 0, result.output
    assert "removed 6 interaction(s), 2 feedback event(s), 7 snapshot example(s)" in result.output
    assert "tainted 2 adapter(s)" in result.output and "champion: 1.1.0 -> base" in result.output


def test_retention_drops_old_interactions_only(settings):
    old, new = turn("alice", "old question?", "old answer.",
                    days_ago=40), turn("alice", "new question?", "new answer.", days_ago=1)
    append(settings, old, new, rating(old, "bob", days_ago=2), rating(new, "bob", days_ago=0.5))
    dropped = apply_retention(settings, 30)
    assert (dropped["interaction"], dropped["feedback"]) == (1, 1)
    left = raw_lines(settings)
    assert [r["id"] for r in left if r["type"] == "interaction"] == [new.id]
    assert [r["interaction_id"] for r in left if r["type"] == "feedback"] == [new.id]
    result = CliRunner().invoke(cli.app, ["retention", "--days", "30"])
    assert result.exit_code == 0 and "dropped 0 interaction(s)" in result.output


def test_export_returns_exactly_the_users_records(settings, populated, tmp_path):
    out = tmp_path / "alice.jsonl"
    result = CliRunner().invoke(cli.app, ["export", "--user", "alice", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    by = {c: [r for r in rows if r["category"] == c]
          for c in ("interaction", "feedback", "snapshot_example", "adapter")}
    assert {r["record"]["id"] for r in by["interaction"]} == {i.id for i in populated["alice"]}
    assert [r["record"]["user_hash"] for r in by["feedback"]] == [h("alice")]
    assert by["snapshot_example"] and all(h("alice") in r["record"]["user_hashes"] for r in by["snapshot_example"])
    assert len(by["snapshot_example"]) == 7  # her six turns + bob's turn she rated
    assert sorted(r["record"]["version"] for r in by["adapter"]) == ["1.0.0", "1.1.0"]
    assert len(rows) == sum(len(v) for v in by.values())
    assert out.stat().st_mode & 0o777 == 0o600
    assert by["interaction"][0]["record"]["joined_feedback"]["score"] == 5
    stdout = CliRunner().invoke(cli.app, ["export", "--user", "alice"]).output
    assert [orjson.loads(line) for line in stdout.splitlines()] == rows


def test_registry_path_outside_workspace_is_refused(settings, populated):
    doc = registry.load(settings)
    doc["snapshots"][0]["file"] = "../../etc/passwd"
    store.atomic_write_json(settings.registry_file, doc)
    raw_before = settings.raw_log.read_bytes()
    with pytest.raises(RegistryError, match="outside the workspace"):
        forget_user(settings, "alice")
    assert settings.raw_log.read_bytes() == raw_before  # refused before anything changed
    with pytest.raises(RegistryError):
        list(export_user(settings, "alice"))
    result = CliRunner().invoke(cli.app, ["forget", "--user", "alice", "--yes"])
    assert result.exit_code == RegistryError.exit_code and "points outside the workspace" in result.output


def test_forget_waits_for_a_running_training(settings, populated, monkeypatch):
    from continuous_learning.capture import gdpr
    from continuous_learning.core.errors import LockHeldError

    monkeypatch.setattr(gdpr, "LOCK_WAIT_S", 0.0)
    raw_before = settings.raw_log.read_bytes()
    with store.workspace_lock(settings.lock_dir, "train"):
        with pytest.raises(LockHeldError, match="'train' lock"):
            forget_user(settings, "alice")
    assert settings.raw_log.read_bytes() == raw_before


def test_forget_and_retention_recount_the_feedback_counters(settings, populated):
    from continuous_learning.capture.ingest import update_feedback_counters

    # counters as the recording path left them: 12 turns rated 5 (the two later ratings change no bucket)
    update_feedback_counters(settings, [(None, Feedback(score=5), None)] * 12)
    assert store.read_json(settings.feedback_metrics)["total"]["turns"] == 12

    forget_user(settings, "alice")
    counts = store.read_json(settings.feedback_metrics)
    assert counts["total"] == counts["adapter:base"] == {
        "helpful": 6, "unhelpful": 0, "neutral": 0, "skipped": 0, "corrected": 0, "turns": 6}

    append(settings, turn("carol", "Old question about valve V-1?", "Valve V-1 is in stock.", days_ago=40))
    update_feedback_counters(settings, [(None, Feedback(score=1), None)])
    assert store.read_json(settings.feedback_metrics)["total"]["turns"] == 7
    apply_retention(settings, 30)
    assert store.read_json(settings.feedback_metrics)["total"]["turns"] == 6


# --- issue 13: nothing deleted that is not provably ours ----------------------------------------------------------
def listing(root: Path) -> dict[str, bytes]:
    files = (p for p in sorted(root.rglob("*")) if p.is_file() and ".cl" not in p.parts)
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


def test_commands_refuse_when_the_registry_was_moved_away(settings, populated, tmp_path):
    (settings.curated_dir / "curated_NOTES.txt").write_text("my own notes about the snapshots\n")
    settings.registry_file.rename(tmp_path / "registry.json.bak")  # as a hint once suggested
    before = listing(settings.home)
    for args in (["curate"], ["curate", "--full"], ["forget", "--user", "alice", "--yes"], ["adapters"]):
        result = CliRunner().invoke(cli.app, args)
        assert result.exit_code == RegistryError.exit_code, (args, result.output)
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and "registry.json is missing" in lines[0] and "1 snapshot" not in lines[0], lines
        assert "3 snapshot file(s)" in lines[0]
    assert listing(settings.home) == before  # every snapshot file and the notes are still there, unchanged


def test_curate_removes_only_the_files_a_killed_curate_marked_as_its_own(settings, populated):
    folder = settings.curated_dir
    killed = "curated_20990101_000000"  # a curate killed after writing its files, before registering them
    (folder / f".{killed}.pending").write_bytes(b"")
    for suffix in (".jsonl", "_eval.jsonl", "_manifest.json"):
        (folder / f"{killed}{suffix}").write_bytes(b"{}\n")
    own_temp = folder / ".curated_20990101_000000.jsonl.k2j4x9qa.cl-tmp"
    own_temp.write_bytes(b"half")
    kept = {"curated_20200101_000000.jsonl": b"{}\n",  # listed by some other registry, perhaps: not provably ours
            "curated_NOTES.txt": b"notes\n", ".notes.tmp": b"mine\n", "curated_20990101_000000.jsonl.bak": b"x\n"}
    for name, data in kept.items():
        (folder / name).write_bytes(data)
    result = CliRunner().invoke(cli.app, ["curate"])
    assert result.exit_code == 0, result.output
    names = {p.name for p in folder.iterdir()}
    assert not names & {f"{killed}.jsonl", f"{killed}_eval.jsonl", f"{killed}_manifest.json", f".{killed}.pending"}
    assert not own_temp.exists()
    assert all((folder / name).read_bytes() == data for name, data in kept.items())
    assert populated["snapshot"] + ".jsonl" in names


# --- issue 13: wrongly shaped lines -------------------------------------------------------------------------------
BAD_SHAPES = [("feedback", "bad"), ("feedback", {"score": "5"}), ("created_at", 12345), ("id", ["x"])]


def bad_lines(settings, user: str) -> list[dict]:
    template = turn(user, "What is order number OR-7?", "Order OR-7 ships today.").to_dict()
    rows = [{**template, "id": f"bad-{i}", key: value} for i, (key, value) in enumerate(BAD_SHAPES)]
    rows.append({"schema_version": 1, "type": "feedback", "id": "bad-fb", "created_at": at(0), "user_hash": h(user),
                 "interaction_id": rows[0]["id"], "feedback": "bad"})
    return rows


def test_wrongly_shaped_lines_are_skipped_and_counted_by_every_reader(settings, populated):
    append(settings, *bad_lines(settings, "alice"))
    with open(settings.raw_log, "ab") as log:  # a torn fragment in the middle of the log, holding text
        log.write(b'{"type": "interaction", "messages": [{"role": "user", "content": "torn secret of alice\n')
    append(settings, turn("bob", "A late question?", "A late answer."))
    runner = CliRunner()
    status = runner.invoke(cli.app, ["status", "--json"])
    assert status.exit_code == 0, status.output
    assert "6 unreadable or wrongly shaped line(s) skipped" in " ".join(orjson.loads(status.stdout)["notes"])
    drift = runner.invoke(cli.app, ["drift", "--json"])
    assert drift.exit_code in (0, 1, 2) and orjson.loads(drift.stdout)["skipped_lines"] == 6, drift.output
    report = runner.invoke(cli.app, ["report"])
    assert report.exit_code == 0 and "Traceback" not in report.output, report.output
    exported = runner.invoke(cli.app, ["export", "--user", "alice"])
    assert exported.exit_code == 0, exported.output
    assert sum('"unreadable_record"' in line for line in exported.stdout.splitlines()) == 5

    forgot = runner.invoke(cli.app, ["forget", "--user", "alice", "--yes", "--json"])
    assert forgot.exit_code == 0, forgot.output
    assert orjson.loads(forgot.stdout)["damaged_lines"] == 1
    raw = settings.raw_log.read_bytes()
    assert h("alice").encode() not in raw and b"torn secret" not in raw and b"bad-" not in raw
    assert [r for _, r in store.iter_jsonl(settings.learning_events) if r.get("event") == "forget"]
    counts = store.read_json(settings.feedback_metrics)["total"]
    assert counts["turns"] == 7  # bob's six turns and his late one, recounted
    retention = runner.invoke(cli.app, ["retention", "--days", "30"])
    assert retention.exit_code == 0 and "dropped 0 interaction(s)" in retention.output


def test_forget_and_retention_stream_a_huge_damaged_line(settings, populated):
    import tracemalloc

    with open(settings.raw_log, "ab") as log:
        log.write(b'{"type": "interaction", "user_hash": "' + h("carol").encode() + b'", "pad": "'
                  + b"secret " * (7 * 1024 * 1024) + b'"}\n')  # a 49 MB line: over the 16 MB record limit
    tracemalloc.start()
    report = forget_user(settings, "alice")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert report.damaged_lines == 1 and report.interactions == 6
    assert peak < 40 * 2**20, f"forget held {peak / 2**20:.0f} MB"
    assert b"secret secret" not in settings.raw_log.read_bytes()
    with open(settings.raw_log, "ab") as log:
        log.write(b'{"pad": "' + b"x" * (20 * 1024 * 1024) + b'"}\n')
    tracemalloc.start()
    dropped = apply_retention(settings, 30)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert dropped["damaged"] == 1 and peak < 40 * 2**20
    assert settings.raw_log.stat().st_size < 1 * 2**20


# --- issue 13: forget reaches everything --------------------------------------------------------------------------
def adapter_folder(settings, version: str, users: list[str], snapshot: str) -> Path:
    folder = settings.adapters_dir / version
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_model.safetensors").write_bytes(b"weights trained on " + ",".join(users).encode())
    (folder / "adapter_config.json").write_text('{"r": 4}')
    (folder / "checkpoint-20").mkdir(exist_ok=True)
    (folder / "checkpoint-20" / "adapter_model.safetensors").write_bytes(b"w")
    lineage = {"version": version, "user_hashes": users, "snapshot": {"id": snapshot}}
    store.atomic_write_json(folder / "lineage.json", lineage)
    return folder


def test_forget_removes_the_user_everywhere(settings, populated):
    from continuous_learning.capture import knowledge

    snap = populated["snapshot"]
    folders = {v: adapter_folder(settings, v, [h("bob")] if v == "1.0.0" else [h("alice"), h("bob")], snap)
               for v in ("1.0.0", "1.1.0")}
    partial = settings.adapters_dir / ".1.2.0.partial"
    partial.mkdir()
    store.atomic_write_json(partial / "run.json", {"version": "1.2.0", "snapshot": {"id": snap}})
    everyone = populated["alice"] + populated["bob"]
    store.append_jsonl(settings.generation_metrics, [{"type": "generation", "interaction_id": i.id, "latency_ms": 5}
                                                     for i in everyone])
    facts = [(knowledge.extract_facts([m["content"] for m in i.messages], settings.knowledge.patterns), i.created_at)
             for i in everyone]
    knowledge.record_facts(settings.knowledge_file, settings.lock_dir, facts)
    assert b"PN-3" in settings.knowledge_file.read_bytes()
    store.atomic_write_json(settings.adapters_dir / "ab_test.json", {
        "id": "t1", "candidate": "1.0.0", "champion": "1.1.0", "traffic": 0.5, "started_at": at(0),
        "status": "running"})
    manifest_path = settings.home / registry.load(settings)["snapshots"][0]["manifest"]
    alice_ids = [i.id.encode() for i in populated["alice"]]
    assert any(i in settings.registry_file.read_bytes() for i in alice_ids)  # the snapshot cursor names her turns

    result = CliRunner().invoke(cli.app, ["forget", "--user", "alice", "--yes", "--json"])
    assert result.exit_code == 0, result.output
    out = orjson.loads(result.stdout)
    assert sorted(out["weights_deleted"]) == ["1.0.0", "1.1.0"] and out["partial_runs_discarded"] == [".1.2.0.partial"]
    assert out["generation_rows"] == 6 and out["ab_test_stopped"] == "t1"
    everywhere = [settings.registry_file, manifest_path, settings.generation_metrics, settings.knowledge_file,
                  settings.raw_log, settings.feedback_metrics, settings.learning_events,
                  *(f / "lineage.json" for f in folders.values())]
    for path in everywhere:
        data = path.read_bytes() if path.exists() else b""
        assert h("alice").encode() not in data and not any(i in data for i in alice_ids), path
    assert b"PN-" not in settings.knowledge_file.read_bytes()  # only alice's turns mentioned part numbers
    for folder in folders.values():  # weights gone, the record of what the adapter was kept
        assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "lineage.json"]
    assert not partial.exists()
    assert [len(store.read_json(f / "lineage.json")["user_hashes"]) for f in folders.values()] == [1, 1]
    ab_state = store.read_json(settings.adapters_dir / "ab_test.json")
    assert ab_state["status"] == "stopped" and "forgotten user" in ab_state["reason"]
    events = [r for _, r in store.iter_jsonl(settings.learning_events)]
    assert [r["test_id"] for r in events if r.get("event") == "ab_stop"] == ["t1"]
    rows = [r["interaction_id"] for _, r in store.iter_jsonl(settings.generation_metrics)]
    assert rows == [i.id for i in populated["bob"]]
