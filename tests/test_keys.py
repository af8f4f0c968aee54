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
from continuous_learning.errors import ConfigError
from continuous_learning.keys import SecretMismatch, hash_user_id, load_salt, read_secret_file, write_secret_file


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
