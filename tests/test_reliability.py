"""Reliability promises, tested for real: concurrent appends, kill -9 at random moments, bad input via the CLI.

Subprocess workers live in tests/helpers_crash.py; each is launched with sys.executable and killed with SIGKILL.
"""
from __future__ import annotations

import errno
import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest
from typer.testing import CliRunner

from continuous_learning import cli, registry
from continuous_learning.core.errors import CLError, LockHeldError
from continuous_learning.core.records import SCHEMA_VERSION, Feedback, Interaction
from continuous_learning.core.settings import load_settings
from continuous_learning.storage import store

HELPER = Path(__file__).with_name("helpers_crash.py")
SEED = int(os.environ.get("CL_CRASH_SEED", "20261123"))


def child_env(home: Path) -> dict:
    return {**os.environ, "CL_HOME": str(home), "CL_USER_HASH_SALT": "test-salt", "PYTHONUNBUFFERED": "1"}


def spawn(home: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(HELPER), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=child_env(home))


def kill9(proc: subprocess.Popen) -> list[str]:
    """SIGKILL the child; return the complete lines it printed (a line cut by the kill is not an ack)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode in (-signal.SIGKILL, 0), err.decode(errors="replace")[-2000:]
    text = out.decode()
    lines = text.split("\n")
    return [line for line in lines[:-1] if line]  # the last piece has no newline: not acknowledged


def wait_for_line(proc: subprocess.Popen, expected: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    line = proc.stdout.readline().decode().strip()
    stderr = proc.stderr.read().decode()[-2000:] if proc.poll() is not None else ""
    assert line == expected, f"child said {line!r}: {stderr}"
    assert time.monotonic() < deadline


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def line_count(path: Path) -> int:
    data = path.read_bytes() if path.exists() else b""
    return data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)


# --- 1. concurrent appends -----------------------------------------------------------------------------
def test_four_processes_append_2000_whole_lines(tmp_path):
    path = tmp_path / "log.jsonl"
    writers = [spawn(tmp_path, "stress", str(path), str(w), "500") for w in range(4)]
    for proc in writers:
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err.decode()[-2000:]
    report = store.ReadReport()
    records = [r for _, r in store.iter_jsonl(path, report)]
    assert report.bad_lines == [] and not report.torn_tail
    assert len(records) == 2000 == line_count(path)
    seqs = defaultdict(list)
    for record in records:
        # a record interleaved with another writer's bytes would not parse, or would carry foreign padding
        assert set(record["pad"]) == {chr(ord("a") + record["writer"])}
        seqs[record["writer"]].append(record["seq"])
    assert {w: sorted(s) for w, s in seqs.items()} == {w: list(range(500)) for w in range(4)}
    assert all(s == sorted(s) for s in seqs.values())  # each writer's lines land in its own order
    big = [r for r in records if len(r["pad"]) > 4096]
    assert len(big) >= 4 * 60 and max(len(r["pad"]) for r in big) > 100_000


# --- 2. kill -9 while appending -------------------------------------------------------------------------
def test_kill9_during_appends_never_loses_an_acknowledged_record(tmp_path):
    rng = random.Random(SEED)
    path = tmp_path / "log.jsonl"
    acked: set[str] = set()
    known_bad: set[int] = set()
    for _ in range(15):
        proc = spawn(tmp_path, "ack", str(path))
        time.sleep(rng.uniform(0.15, 0.7))
        acked.update(kill9(proc))
        report = store.ReadReport()
        found = {r["id"] for _, r in store.iter_jsonl(path, report)}  # never raises
        missing = acked - found
        assert not missing, f"{len(missing)} acknowledged record(s) lost"
        new_bad = {n for n, _ in report.bad_lines} - known_bad
        assert new_bad <= {line_count(path)}, f"a torn line that is not the tail: {report.bad_lines}"
        if new_bad:
            assert report.torn_tail
        known_bad |= new_bad
    assert len(acked) > 15
    # the next append starts on a fresh line and is readable whatever the killed writer left behind
    store.append_jsonl(path, [{"id": "after-the-kills"}])
    report = store.ReadReport()
    last = list(store.iter_jsonl(path, report))[-1]
    assert last == (line_count(path), {"id": "after-the-kills"}) and not report.torn_tail


def test_torn_tail_is_skipped_reported_and_the_next_append_starts_a_fresh_line(tmp_path):
    path = tmp_path / "log.jsonl"
    store.append_jsonl(path, [{"id": "a"}, {"id": "b"}])
    with open(path, "ab") as handle:
        handle.write(b'{"id": "c", "pad": "half a rec')  # what a writer killed mid-write leaves
    report = store.ReadReport()
    assert [r["id"] for _, r in store.iter_jsonl(path, report)] == ["a", "b"]
    assert report.torn_tail and report.bad_lines == [(3, "torn last line")]
    store.append_jsonl(path, [{"id": "d"}])
    report = store.ReadReport()
    assert [r["id"] for _, r in store.iter_jsonl(path, report)] == ["a", "b", "d"]
    assert not report.torn_tail and [n for n, _ in report.bad_lines] == [3]


# --- 3. kill -9 during registry updates ------------------------------------------------------------------
def test_kill9_during_registry_updates_leaves_a_valid_registry_and_a_free_lock(tmp_path):
    rng = random.Random(SEED + 3)
    home = tmp_path / "ws"
    settings = load_settings(home=home, env={})
    acked: set[str] = set()
    for i in range(15):
        proc = spawn(home, "registry")
        time.sleep(rng.uniform(0.2, 0.6))
        acked.update(kill9(proc))
        doc = registry.load(settings)  # loads and validates: never half a file
        assert acked <= set(doc["adapters"])
        # the kernel dropped the dead holder's flock: the lock is free at once
        with store.workspace_lock(settings.lock_dir, "registry", wait=0):
            pass
        planted = settings.adapters_dir / f".registry.json.plant{i:03d}.cl-tmp"  # a killed writer's temp name
        planted.write_bytes(b'{"half": ')
        after = registry.update(settings, lambda d: d, "test_noop")
        assert after == registry.load(settings)
        assert list(settings.adapters_dir.glob(".*tmp")) == []  # stale temp files cleaned by the next update
    assert len(acked) >= 15


# --- 4. kill -9 during curate ------------------------------------------------------------------------------
WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa quebec "
         "romeo sierra tango uniform victor whiskey xray yankee zulu amber basalt cobalt dune ember fjord "
         "granite").split()


def make_interactions(rng: random.Random, count: int, start: datetime) -> list[dict]:
    out = []
    for i in range(count):
        prompt = " ".join(rng.choice(WORDS) for _ in range(12)) + f" question {i}?"
        answer = " ".join(rng.choice(WORDS) for _ in range(25)) + "."
        moment = (start + timedelta(seconds=i)).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        out.append(Interaction(messages=[{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
                               session_id=f"s{i % 40}", user_hash=f"u{i % 25}", feedback=Feedback(helpful=True),
                               created_at=moment, recorded_at=moment).to_dict())
    return out


def check_snapshots(settings) -> list[dict]:
    """Every registered snapshot's files exist and match the sha256 recorded in the registry."""
    doc = registry.load(settings)
    for snap in doc["snapshots"]:
        train, held_out = settings.home / snap["file"], settings.home / snap["eval_file"]
        assert train.is_file() and held_out.is_file() and (settings.home / snap["manifest"]).is_file(), snap["id"]
        assert sha256(train) == snap["sha256"] and sha256(held_out) == snap["eval_sha256"], snap["id"]
    return doc["snapshots"]


def test_kill9_during_curate_never_registers_a_broken_snapshot(tmp_path):
    from continuous_learning.curate import run_curate

    rng = random.Random(SEED + 4)
    home = tmp_path / "ws"
    settings = load_settings(home=home, env={"CL_USER_HASH_SALT": "test-salt"})
    start = datetime(2026, 1, 5, tzinfo=UTC)
    store.append_jsonl(settings.raw_log, make_interactions(rng, 2500, start))
    raw_before = settings.raw_log.read_bytes()

    proc = spawn(home, "curate")
    wait_for_line(proc, "start")
    started = time.perf_counter()
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err.decode()[-3000:]
    duration = time.perf_counter() - started  # the curate itself, after the child's start-up
    assert len(check_snapshots(settings)) == 1

    outcomes = []
    for _ in range(8):
        proc = spawn(home, "curate")
        wait_for_line(proc, "start")
        time.sleep(rng.uniform(0.0, 0.9 * duration))
        outcomes.append(len(kill9(proc)))
        check_snapshots(settings)
        assert settings.raw_log.read_bytes() == raw_before  # curate never touches the raw log
    assert 0 in outcomes, f"no kill landed mid-curate (a curate takes {duration:.2f}s)"
    # leftovers of the kills (plus planted ones) must not break the next curate
    (settings.curated_dir / ".curated_planted.jsonl.x8k2p0qz.cl-tmp").write_bytes(b"half")
    (settings.adapters_dir / ".registry.json.x8k2p0qz.tmp").write_bytes(b"{")  # the name earlier versions used
    store.append_jsonl(settings.raw_log, make_interactions(rng, 50, start + timedelta(days=3)))
    manifest = run_curate(settings, include_unrated=True)
    assert manifest["status"] == "created"
    snapshots = check_snapshots(settings)
    assert snapshots[-1]["id"] == manifest["id"]
    assert list(settings.adapters_dir.glob(".*tmp")) == []
    # the next curate also cleared what killed runs left in data/curated: only registered snapshots remain
    registered = {i + suffix for i in (s["id"] for s in snapshots) for suffix in (".jsonl", "_eval.jsonl",
                                                                                   "_manifest.json")}
    leftovers = [p.name for p in settings.curated_dir.iterdir()
                 if p.name.startswith(".") and p.name.endswith(("tmp", ".pending"))
                 or p.name.startswith("curated_") and not any(p.name.startswith(r) for r in registered)]
    assert leftovers == []


# --- 5. the workspace lock names its holder ----------------------------------------------------------------
def test_second_holder_of_the_workspace_lock_is_told_the_first_ones_pid(tmp_path):
    home = tmp_path / "ws"
    settings = load_settings(home=home, env={})
    proc = spawn(home, "hold", "train")
    try:
        wait_for_line(proc, "held")
        with pytest.raises(LockHeldError) as caught:
            with store.workspace_lock(settings.lock_dir, "train"):
                pytest.fail("two holders of one lock")
        assert f"pid {proc.pid}" in caught.value.message and caught.value.exit_code != 0
    finally:
        kill9(proc)
    with store.workspace_lock(settings.lock_dir, "train"):  # released by the kernel when the holder died
        pass


# --- 6. bad input through the CLI --------------------------------------------------------------------------
def invoke(*args: str):
    return CliRunner().invoke(cli.app, list(args))


def assert_one_clear_line(result, *needles: str) -> str:
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    for needle in needles:
        assert needle in lines[0], result.output
    return lines[0]


def write_registry(settings, doc) -> bytes:
    data = doc if isinstance(doc, bytes) else orjson.dumps(doc)
    store.ensure_dir(settings.adapters_dir)
    settings.registry_file.write_bytes(data)
    return data


@pytest.mark.parametrize("content, needles", [
    (b"this is { not json", ["registry.json", "not valid JSON"]),
    ({"schema_version": SCHEMA_VERSION, "snapshots": [], "adapters": [], "champion": None, "history": []},
     ["registry.json", "'adapters'"]),
    ({"schema_version": SCHEMA_VERSION, "snapshots": [], "adapters": {}, "champion": "9.9.9", "history": []},
     ["registry.json", "'champion'", "9.9.9"]),
    ({"schema_version": SCHEMA_VERSION, "snapshots": [], "adapters": {"1.0.0": {"status": "great"}}, "champion": None,
      "history": []}, ["registry.json", "adapters.1.0.0.status"]),
    ([1, 2, 3], ["registry.json", "JSON object"]),
    ({"schema_version": SCHEMA_VERSION, "snapshots": [], "champion": None, "history": [],
      "adapters": {"1.0.0": {"status": "candidate", "evals": 5}}}, ["adapters.1.0.0.evals", "must be a list"]),
    ({"schema_version": SCHEMA_VERSION, "snapshots": [], "champion": None, "history": [],
      "adapters": {"1.0.0": {"status": "candidate", "sha256": ["abc"]}}}, ["adapters.1.0.0.sha256"]),
    ({"schema_version": SCHEMA_VERSION, "snapshots": [{"id": "s", "user_hashes": "abc"}], "adapters": {},
      "champion": None, "history": []}, ["snapshots[0].user_hashes"]),
    ({"schema_version": SCHEMA_VERSION, "snapshots": [], "champion": None, "history": [],
      "adapters": {"1.0.0": {"status": "candidate", "snapshot": "s"}}}, ["adapters.1.0.0.snapshot", "must be a dict"]),
    ({"schema_version": SCHEMA_VERSION, "snapshots": [], "adapters": {}, "champion": None, "history": ["x"]},
     ["history[0]"]),
    ({"schema_version": "1", "snapshots": [], "adapters": {}, "champion": None, "history": []},
     ["'schema_version' must be an integer"]),
    ({"schema_version": 99, "snapshots": [], "adapters": {}, "champion": None, "history": []},
     ["schema_version 99", "newer cl"]),
])
def test_registry_edited_into_nonsense_is_named_and_left_alone(settings, content, needles):
    data = write_registry(settings, content)
    result = invoke("adapters")
    assert_one_clear_line(result, *needles)
    assert settings.registry_file.read_bytes() == data
    with_debug = invoke("--debug", "adapters")  # --debug lets the typed error (and its traceback) through
    assert isinstance(with_debug.exception, CLError)


def test_an_unversioned_registry_is_migrated_on_open(settings):
    """Registries from before `schema_version` existed are migrated (ordered, named steps), not refused."""
    unversioned = {"snapshots": [], "adapters": {"1.0.0": {"status": "candidate", "path": "adapters/1.0.0"}}}
    write_registry(settings, unversioned)
    assert registry.MIGRATIONS[0][1] == "0001_unversioned_registry"
    result = invoke("adapters")
    assert result.exit_code == 0 and "1.0.0" in result.output, result.output
    registry.update(settings, lambda d: d, "test_noop")  # the next change writes the migrated document
    doc = orjson.loads(settings.registry_file.read_bytes())
    assert doc["schema_version"] == registry.REGISTRY_SCHEMA_VERSION
    assert doc["history"] == [] and doc["champion"] is None


@pytest.mark.parametrize("content, needle", [
    (b"", "has no eval questions"),
    (b'{"prompt": "What is the capital of France?"}\n', "keywords"),
    (b'{"prompt": "x", "keywords": "Paris"\n', "not valid JSON"),
])
def test_bad_eval_file_is_one_clear_line(settings, tmp_path, content, needle):
    eval_file = tmp_path / "qa.jsonl"
    eval_file.write_bytes(content)
    result = invoke("eval", "--eval-file", str(eval_file), "--no-general", "--no-promote")
    assert_one_clear_line(result, needle)
    assert eval_file.read_bytes() == content


def fake_adapter(settings, version: str, status: str) -> dict:
    folder = settings.adapters_dir / version
    store.ensure_dir(folder)
    files = {"adapter_model.safetensors": os.urandom(256), "adapter_config.json": b'{"r": 8}'}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return {"version": version, "path": f"adapters/{version}", "status": status, "evals": [],
            "sha256": {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}}


@pytest.mark.parametrize("damage, needle", [
    ("delete_folder", "is missing"),
    ("delete_file", "is missing"),
    ("edit_file", "sha256"),
])
def test_rollback_refuses_an_adapter_changed_behind_the_registrys_back(settings, damage, needle):
    doc = registry.empty_registry()
    doc["adapters"] = {"1.0.0": fake_adapter(settings, "1.0.0", "archived"),
                       "1.1.0": fake_adapter(settings, "1.1.0", "champion")}
    doc["champion"] = "1.1.0"
    data = write_registry(settings, doc)
    target = settings.adapters_dir / "1.0.0"
    if damage == "delete_folder":
        for child in target.iterdir():
            child.unlink()
        target.rmdir()
    elif damage == "delete_file":
        (target / "adapter_model.safetensors").unlink()
    else:
        with open(target / "adapter_model.safetensors", "r+b") as handle:
            handle.write(b"\x00")
    result = invoke("rollback", "--to", "1.0.0")
    assert_one_clear_line(result, "1.0.0", needle)
    assert settings.registry_file.read_bytes() == data  # the champion pointer did not move


def test_rollback_to_an_intact_adapter_still_works(settings):
    doc = registry.empty_registry()
    doc["adapters"] = {"1.0.0": fake_adapter(settings, "1.0.0", "archived"),
                       "1.1.0": fake_adapter(settings, "1.1.0", "champion")}
    doc["champion"] = "1.1.0"
    write_registry(settings, doc)
    result = invoke("rollback", "--to", "1.0.0")
    assert result.exit_code == 0, result.output
    assert registry.load(settings)["champion"] == "1.0.0"


def test_unwritable_workspace_is_one_clear_line(settings, tmp_path):
    # running as root ignores chmod, so make the workspace unwritable another way: a file where a folder must go
    (settings.home / "data").write_bytes(b"not a folder")
    source = tmp_path / "in.jsonl"
    source.write_bytes(orjson.dumps({"prompt": "What is two plus two?", "response": "Four."}) + b"\n")
    result = invoke("ingest", str(source))
    line = assert_one_clear_line(result, "cannot create folder", "data", "Not a directory")
    assert "--debug" not in line  # a handled error saying what to do, not an unexpected one
    assert (settings.home / "data").read_bytes() == b"not a folder"


def test_unwritable_workspace_permissions(settings, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root ignores file permissions")
    source = tmp_path / "in.jsonl"
    source.write_bytes(orjson.dumps({"prompt": "What is two plus two?", "response": "Four."}) + b"\n")
    settings.home.chmod(0o500)
    try:
        result = invoke("ingest", str(source))
        assert_one_clear_line(result, "permission denied")
    finally:
        settings.home.chmod(0o700)


def _enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_append_under_enospc_says_disk_full_and_changes_nothing(tmp_path, monkeypatch):
    path = tmp_path / "log.jsonl"
    store.append_jsonl(path, [{"id": "kept"}])
    before = path.read_bytes()
    with monkeypatch.context() as patch:
        patch.setattr(store.os, "write", _enospc)
        with pytest.raises(CLError, match="disk full"):
            store.append_jsonl(path, [{"id": "lost", "pad": "x" * 10_000}])
    assert path.read_bytes() == before


def test_append_cut_short_by_enospc_leaves_no_partial_line(tmp_path, monkeypatch):
    """The disk fills up after part of the line went out: the file must be as it was, not carry half a record."""
    path = tmp_path / "log.jsonl"
    store.append_jsonl(path, [{"id": "kept"}])
    before = path.read_bytes()
    real_write = os.write
    calls = []

    def half_then_full(fd, data):
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patch:
        patch.setattr(store.os, "write", half_then_full)
        with pytest.raises(CLError, match="disk full"):
            store.append_jsonl(path, [{"id": "lost", "pad": "x" * 10_000}])
    assert path.read_bytes() == before
    store.append_jsonl(path, [{"id": "next"}])
    assert [r["id"] for _, r in store.iter_jsonl(path)] == ["kept", "next"]


def test_atomic_write_under_enospc_keeps_the_original_and_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "registry.json"
    store.atomic_write_json(path, {"keep": True})
    before = path.read_bytes()
    with monkeypatch.context() as patch:
        patch.setattr(store.os, "write", _enospc)
        with pytest.raises(CLError, match="disk full"):
            store.atomic_write_bytes(path, b"x" * 100_000)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["registry.json"]


def test_cli_turns_enospc_into_one_line(settings, tmp_path, monkeypatch):
    source = tmp_path / "in.jsonl"
    source.write_bytes(orjson.dumps({"prompt": "What is two plus two?", "response": "Four."}) + b"\n")
    assert invoke("ingest", str(source)).exit_code == 0
    before = settings.raw_log.read_bytes()
    monkeypatch.setattr(store.os, "write", _enospc)
    result = invoke("ingest", str(source))
    monkeypatch.undo()
    assert_one_clear_line(result, "disk full")
    assert settings.raw_log.read_bytes() == before


# --- 6. kill -9 during promote / rollback, forget and train ------------------------------------------------
def champions_consistent(doc: dict) -> None:
    marked = [v for v, entry in doc["adapters"].items() if entry.get("status") == "champion"]
    assert marked == ([doc["champion"]] if doc["champion"] else []), (doc["champion"], marked)


def test_kill9_during_promote_and_rollback_keeps_one_valid_champion(tmp_path):
    from continuous_learning.registry import verify_adapter_files

    rng = random.Random(SEED + 6)
    home = tmp_path / "ws"
    settings = load_settings(home=home, env={})
    versions = ("1.0.0", "1.1.0", "1.2.0")
    doc = registry.empty_registry()
    doc["adapters"] = {v: fake_adapter(settings, v, "candidate") for v in versions}
    write_registry(settings, doc)
    moves = 0
    for _ in range(12):
        proc = spawn(home, "flip", *versions)
        time.sleep(rng.uniform(0.3, 0.8))
        acked = kill9(proc)
        moves += len(acked)
        doc = registry.load(settings)
        champions_consistent(doc)
        if acked and acked[-1] != "None":  # the last acknowledged move stands, or a later one replaced it
            assert doc["champion"] is not None
        for version in versions:
            verify_adapter_files(settings, doc["adapters"][version])
        with store.workspace_lock(settings.lock_dir, "registry", wait=0):
            pass
    assert moves >= 12
    result = invoke("--home", str(home), "promote", "1.2.0")
    assert result.exit_code == 0, result.output
    assert registry.load(settings)["champion"] == "1.2.0"  # its speed: bench/bench_rollback.py (same path)


def test_kill9_during_forget_then_a_rerun_finishes_the_job(tmp_path, monkeypatch):
    from continuous_learning.capture.gdpr import forget_user
    from continuous_learning.curate import run_curate

    monkeypatch.setenv("CL_USER_HASH_SALT", "test-salt")  # the salt is read when a user id is hashed
    rng = random.Random(SEED + 7)
    home = tmp_path / "ws"
    settings = load_settings(home=home, env={"CL_USER_HASH_SALT": "test-salt"})
    start = datetime(2026, 1, 5, tzinfo=UTC)
    records = make_interactions(rng, 3000, start)
    users = [f"user{i}" for i in range(25)]
    for i, record in enumerate(records):  # real salted hashes, so `forget --user userN` finds them
        record["user_hash"] = registry_hash(users[i % 25])
    store.append_jsonl(settings.raw_log, records)
    assert run_curate(settings, include_unrated=True)["status"] == "created"
    per_user = {u: sum(1 for r in records if r["user_hash"] == registry_hash(u)) for u in users}

    landed_mid_way = 0
    for user in users[:6]:
        proc = spawn(home, "forget", user)
        wait_for_line(proc, "start")
        time.sleep(rng.uniform(0.0, 0.8))
        said = kill9(proc)
        landed_mid_way += "done" not in said
        raw = [r for _, r in store.iter_jsonl(settings.raw_log)]  # whole lines only, or this raises
        left = sum(1 for r in raw if r["user_hash"] == registry_hash(user))
        assert left in (0, per_user[user])  # the raw log is rewritten atomically: all of the user's lines or none
        registry.load(settings)
        forget_user(settings, user)  # the next run finishes whatever the kill interrupted
        check_snapshots(settings)
        holding = [p.name for p in (settings.raw_log, *settings.curated_dir.iterdir())
                   if p.is_file() and registry_hash(user).encode() in p.read_bytes()]
        assert holding == [], f"{user} left in {holding} after {said}"
        assert list(settings.curated_dir.glob(".*tmp")) == [] and list(settings.raw_log.parent.glob(".*tmp")) == []
    remaining = [r for _, r in store.iter_jsonl(settings.raw_log)]
    assert len(remaining) == sum(per_user[u] for u in users[6:])
    assert landed_mid_way >= 1, "no kill landed before a forget finished"


def registry_hash(user: str) -> str:
    from continuous_learning.capture.privacy import hash_user_id

    return hash_user_id(user, b"test-salt")


def test_kill9_during_train_registers_nothing_half_made(workspace, monkeypatch):
    from continuous_learning.curate import run_curate
    from continuous_learning.registry import verify_adapter_files
    from continuous_learning.train import run_training

    rng = random.Random(SEED + 8)
    monkeypatch.setenv("CL_TRAIN_MAX_STEPS", "40")
    settings = load_settings()
    store.append_jsonl(settings.raw_log, make_interactions(rng, 40, datetime(2026, 1, 5, tzinfo=UTC)))
    assert run_curate(settings, include_unrated=True)["status"] == "created"
    acked: list[str] = []
    for delay in (1.0, 3.0, 5.0, 7.0):
        proc = spawn(workspace, "train")
        wait_for_line(proc, "start")
        time.sleep(delay * rng.uniform(0.8, 1.2))
        acked += [line for line in kill9(proc) if line != "start"]
        doc = registry.load(settings)
        assert set(acked) <= set(doc["adapters"])
        for entry in doc["adapters"].values():  # whatever is registered is whole
            verify_adapter_files(settings, entry)
        with store.workspace_lock(settings.lock_dir, "train", wait=0):
            pass
    before = set(registry.load(settings)["adapters"])
    entry = run_training(settings)  # the next run discards the killed runs' folders and finishes
    doc = registry.load(settings)
    assert set(doc["adapters"]) == before | {entry["version"]}
    verify_adapter_files(settings, doc["adapters"][entry["version"]])
    assert [p.name for p in settings.adapters_dir.iterdir() if p.name.startswith(".")] == []


def test_a_50mb_line_in_the_raw_log_is_skipped_reported_and_never_held_whole(tmp_path):
    import tracemalloc

    from continuous_learning.curate import run_curate

    rng = random.Random(SEED + 9)
    settings = load_settings(home=tmp_path / "ws", env={"CL_USER_HASH_SALT": "test-salt"})
    good = make_interactions(rng, 30, datetime(2026, 1, 5, tzinfo=UTC))
    store.append_jsonl(settings.raw_log, good[:15])
    with open(settings.raw_log, "ab") as handle:
        handle.write(b'{"type": "interaction", "pad": "' + b"z" * (50 * 1024 * 1024) + b'"}\n')
    store.append_jsonl(settings.raw_log, good[15:])

    report = store.ReadReport()
    tracemalloc.start()
    ids = [record["id"] for _, record in store.iter_jsonl(settings.raw_log, report)]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert ids == [r["id"] for r in good]
    assert [n for n, _ in report.bad_lines] == [16] and "longer than" in report.bad_lines[0][1]
    # at most one chunk of the 16 MB record limit (plus its copy) is held, never the 50 MB line
    assert peak < 40 * 1024 * 1024, f"reading held {peak / 2**20:.0f} MB"
    manifest = run_curate(settings, include_unrated=True)
    assert manifest["status"] == "created" and manifest["counts"]["bad_lines"] == 1


@pytest.mark.parametrize("bad", [
    {"type": "interaction", "messages": "not a list", "session_id": "s"},
    {"type": "interaction", "messages": [], "session_id": "s", "feedback": 7},
    {"type": "interaction"},
])
def test_wrongly_shaped_interaction_records_are_skipped_by_readers(tmp_path, bad):
    from continuous_learning.capture.ingest import iter_interactions

    rng = random.Random(SEED + 10)
    settings = load_settings(home=tmp_path / "ws", env={})
    good = make_interactions(rng, 3, datetime(2026, 1, 5, tzinfo=UTC))
    store.append_jsonl(settings.raw_log, [good[0], bad, *good[1:]])
    report = store.ReadReport()
    assert [i.id for i in iter_interactions(settings, report)] == [r["id"] for r in good]
    assert [n for n, _ in report.bad_lines] == [2]
    result = invoke("--home", str(settings.home), "drift")
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
