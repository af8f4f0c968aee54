"""Workspace secrets: user-id hashing, the salt, the encryption key, their fingerprints and secret files."""
from __future__ import annotations

import re
import stat
import threading
from pathlib import Path

import orjson
import pytest
from cryptography.fernet import Fernet
from typer.testing import CliRunner

from continuous_learning import cli
from continuous_learning.core.errors import ConfigError
from continuous_learning.storage.keys import (
    SecretMismatch,
    hash_user_id,
    load_salt,
    read_secret_file,
    write_secret_file,
)


# --- moved from test_privacy.py: hashing and the salt file ----------------------------------------------------
def test_hash_user_id_is_keyed_and_deterministic() -> None:
    a, b = b"a" * 32, b"b" * 32
    assert hash_user_id("alice", a) == hash_user_id("alice", a)
    assert hash_user_id("alice", a) != hash_user_id("alice", b)
    assert hash_user_id("alice", a) != hash_user_id("bob", a)
    assert re.fullmatch(r"[0-9a-f]{64}", hash_user_id("alice", a))


def test_load_salt_creates_a_private_file_once(tmp_path: Path) -> None:
    salt_file = tmp_path / ".cl" / "user_hash_salt"
    salt, created = load_salt(salt_file, env={})
    assert created and len(salt) == 32
    assert stat.S_IMODE(salt_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(salt_file.parent.stat().st_mode) == 0o700
    assert load_salt(salt_file, env={}) == (salt, False)
    assert sorted(p.name for p in salt_file.parent.iterdir()) == ["fingerprints.json", "locks", "user_hash_salt"]
    assert salt.hex() not in (salt_file.parent / "fingerprints.json").read_text()  # no temp files, no secret


def test_the_environment_wins_but_must_be_the_workspace_salt(tmp_path: Path) -> None:
    salt_file = tmp_path / ".cl" / "user_hash_salt"
    assert load_salt(salt_file, env={"CL_USER_HASH_SALT": "from-env"}) == (b"from-env", False)
    assert not salt_file.exists()
    assert load_salt(salt_file, env={"CL_USER_HASH_SALT": "from-env"})[0] == b"from-env"
    with pytest.raises(SecretMismatch, match="salt differs"):  # the workspace file now would be another salt
        load_salt(salt_file, env={})
    with pytest.raises(SecretMismatch, match="salt differs"):
        load_salt(salt_file, env={"CL_USER_HASH_SALT": "another"}, record=False)


def test_concurrent_first_use_agrees_on_one_salt(tmp_path: Path) -> None:
    salt_file = tmp_path / "salt"
    results: list[tuple[bytes, bool]] = []
    barrier = threading.Barrier(8)

    def worker() -> None:
        barrier.wait()
        results.append(load_salt(salt_file, env={}))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({salt for salt, _ in results}) == 1
    assert sum(created for _, created in results) == 1


def test_empty_salt_file_is_an_error(tmp_path: Path) -> None:
    salt_file = tmp_path / "salt"
    salt_file.write_bytes(b"")
    with pytest.raises(ConfigError, match="empty"):
        load_salt(salt_file, env={})


# --- secret files (how scheduled jobs get the salt and the key) ------------------------------------------------
def test_secret_files_must_be_private(tmp_path: Path) -> None:
    path = write_secret_file(tmp_path / "secrets" / "key", "s3cret")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert read_secret_file(path, "CL_ENCRYPTION_KEY_FILE") == "s3cret"
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="can be read by other users"):
        read_secret_file(path, "CL_ENCRYPTION_KEY_FILE")
    salt_file = tmp_path / ".cl" / "user_hash_salt"
    path.chmod(0o600)
    assert load_salt(salt_file, env={"CL_USER_HASH_SALT_FILE": str(path)})[0] == b"s3cret"


# --- through the CLI, as a user would cause it -------------------------------------------------------------------
@pytest.fixture
def bare(tmp_path, monkeypatch) -> Path:
    """A workspace without a model: these tests never generate."""
    home = tmp_path / "ws"
    home.mkdir()
    monkeypatch.setenv("CL_HOME", str(home))
    monkeypatch.setenv("CL_USER_HASH_SALT", "first-salt")
    monkeypatch.delenv("CL_ENCRYPTION_KEY", raising=False)
    return home


def ingest_file(tmp_path: Path, user: str, n: int = 1, rated: bool = False) -> Path:
    path = tmp_path / f"{user}.jsonl"
    rows = [{"prompt": f"What is part number PN-{i} used for, {user}?", "response": f"Part PN-{i} holds the valve.",
             "user_id": user, **({"feedback": {"score": 5}} if rated else {})} for i in range(n)]
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    return path


def one_error_line(result) -> str:
    assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


def raw_log(home: Path) -> Path:
    return home / "data" / "ingestion" / "raw_interactions.jsonl"


def test_a_second_encryption_key_is_refused_instead_of_mixing_into_the_log(bare, tmp_path, monkeypatch):
    first, second = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    runner = CliRunner()
    monkeypatch.setenv("CL_ENCRYPTION_KEY", first)
    assert runner.invoke(cli.app, ["ingest", str(ingest_file(tmp_path, "alice"))]).exit_code == 0
    before = raw_log(bare).read_bytes()
    monkeypatch.setenv("CL_ENCRYPTION_KEY", second)
    assert "not the key this workspace's texts are encrypted with" in one_error_line(
        runner.invoke(cli.app, ["ingest", str(ingest_file(tmp_path, "bob"))]))
    monkeypatch.delenv("CL_ENCRYPTION_KEY")
    assert "encrypted, but CL_ENCRYPTION_KEY is not set" in one_error_line(
        runner.invoke(cli.app, ["ingest", str(ingest_file(tmp_path, "bob"))]))
    assert raw_log(bare).read_bytes() == before  # nothing sealed with another key, nothing stored in clear
    monkeypatch.setenv("CL_ENCRYPTION_KEY", first)
    exported = runner.invoke(cli.app, ["export", "--user", "alice"])
    assert exported.exit_code == 0 and "PN-0" in exported.stdout  # everything still decrypts
    fingerprints = orjson.loads((bare / ".cl" / "fingerprints.json").read_bytes())
    assert set(fingerprints) == {"user_hash_salt", "encryption_key"} and first not in str(fingerprints)


def test_another_salt_is_an_error_not_nothing_stored(bare, tmp_path, monkeypatch):
    runner = CliRunner()
    assert runner.invoke(cli.app, ["ingest", str(ingest_file(tmp_path, "alice", 3))]).exit_code == 0
    before = raw_log(bare).read_bytes()
    monkeypatch.setenv("CL_USER_HASH_SALT", "another-salt")
    line = one_error_line(runner.invoke(cli.app, ["forget", "--user", "alice", "--yes"]))
    assert "salt differs from the one this workspace's data was written with" in line
    monkeypatch.delenv("CL_USER_HASH_SALT")  # the workspace file would be another salt too
    one_error_line(runner.invoke(cli.app, ["export", "--user", "alice"]))
    assert raw_log(bare).read_bytes() == before
    monkeypatch.setenv("CL_USER_HASH_SALT", "first-salt")
    done = runner.invoke(cli.app, ["forget", "--user", "alice", "--yes"])
    assert done.exit_code == 0 and "removed 3 interaction(s)" in done.output, done.output


@pytest.fixture
def fake_crontab(tmp_path, monkeypatch) -> Path:
    bin_dir, table = tmp_path / "bin", tmp_path / "crontab.txt"
    bin_dir.mkdir()
    tool = bin_dir / "crontab"
    tool.write_text("#!/bin/sh\ncase \"$1\" in\n"
                    f"  -l) cat '{table}' 2>/dev/null || {{ echo 'no crontab' >&2; exit 1; }} ;;\n"
                    f"  -) cat > '{table}' ;;\nesac\n")
    tool.chmod(0o755)
    (bin_dir / "systemctl").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "systemctl").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{__import__('os').environ['PATH']}")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    return table


def test_scheduled_jobs_read_the_key_and_salt_from_private_files(bare, tmp_path, monkeypatch, fake_crontab):
    import os
    import shlex
    import subprocess

    key = Fernet.generate_key().decode()
    monkeypatch.setenv("CL_ENCRYPTION_KEY", key)
    runner = CliRunner()
    assert runner.invoke(cli.app, ["ingest", str(ingest_file(tmp_path, "alice", 12, rated=True))]).exit_code == 0
    installed = runner.invoke(cli.app, ["schedule", "install"])
    assert installed.exit_code == 0, installed.output
    crontab = fake_crontab.read_text()
    assert key not in crontab and "first-salt" not in crontab  # no secret in the crontab or on a command line
    daily = next(line for line in crontab.splitlines() if "curate,drift" in line)
    files = dict(re.findall(r"(CL_ENCRYPTION_KEY_FILE|CL_USER_HASH_SALT_FILE)=(\S+)", daily))
    for name, path in files.items():
        path = Path(shlex.split(path)[0])
        assert stat.S_IMODE(path.stat().st_mode) == 0o600 and not path.is_relative_to(bare), name
    assert set(files) == {"CL_ENCRYPTION_KEY_FILE", "CL_USER_HASH_SALT_FILE"}
    command = daily.split(" ", 5)[5].replace("\\%", "%")
    cron_env = {"PATH": "/usr/bin:/bin", "HOME": os.environ["HOME"], "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    subprocess.run(["sh", "-c", command], env=cron_env, check=True, timeout=300)  # as cron would run it
    log = (bare / "logs" / "cycle_cron.log").read_text()
    snapshots = orjson.loads((bare / "adapters" / "registry.json").read_bytes())["snapshots"]
    assert len(snapshots) == 1, log  # curate decrypted the log and hashed with the right salt
    units = runner.invoke(cli.app, ["schedule", "install", "--systemd"])
    assert units.exit_code == 0, units.output
    service = next((tmp_path / "home" / ".config" / "systemd" / "user").glob("*-daily.service")).read_text()
    assert "Environment=CL_ENCRYPTION_KEY_FILE=" in service and key not in service
    assert runner.invoke(cli.app, ["schedule", "remove", "--systemd"]).exit_code == 0
    assert Path(files["CL_ENCRYPTION_KEY_FILE"]).exists()  # the crontab still needs it
    assert runner.invoke(cli.app, ["schedule", "remove"]).exit_code == 0
    assert not Path(files["CL_ENCRYPTION_KEY_FILE"]).exists()  # written by install, removed with the schedule
