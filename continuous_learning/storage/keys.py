"""Workspace secrets: the salt of user-id hashes and the encryption key, each pinned to its workspace.

A salt or key that differs from the one the data was written with would silently make `cl forget` find nothing
(another salt) or mix undecryptable texts into the log (another key). So the first use records a fingerprint of
each in `.cl/fingerprints.json` (an HMAC of a fixed label under the secret: it reveals nothing about the secret),
and every later use with a different one is refused with a clear message.

Secrets come from the environment (`CL_USER_HASH_SALT`, `CL_ENCRYPTION_KEY`) or from files named by
`CL_USER_HASH_SALT_FILE` / `CL_ENCRYPTION_KEY_FILE`, which must be readable by their owner only (mode 0600):
that is how scheduled jobs get them without a secret on any command line. Without either, the salt is the
workspace's own `.cl/user_hash_salt` (32 random bytes, created once).
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
import time
from collections.abc import Mapping
from pathlib import Path

import orjson

from ..core.errors import ConfigError

SALT_ENV = "CL_USER_HASH_SALT"
SALT_FILE_ENV = "CL_USER_HASH_SALT_FILE"
KEY_ENV = "CL_ENCRYPTION_KEY"
KEY_FILE_ENV = "CL_ENCRYPTION_KEY_FILE"
ADMIN_TOKEN_ENV = "CL_ADMIN_TOKEN"
SALT_BYTES = 32
FINGERPRINTS = "fingerprints.json"


class SecretMismatch(ConfigError):
    """A salt or key other than the one this workspace's data was written with."""


# --- where secrets come from -----------------------------------------------------------------------------------
def secret_env(env: Mapping[str, str] | None = None) -> Mapping[str, str]:
    """The one place secrets are read from: the given mapping (tests, launched processes) or the process
    environment. Salt, encryption key and admin token never come from cl.toml, so they are not Settings."""
    return os.environ if env is None else env


def admin_token(env: Mapping[str, str] | None = None) -> str | None:
    """CL_ADMIN_TOKEN, or None when the service's admin routes are off."""
    return secret_env(env).get(ADMIN_TOKEN_ENV) or None


# --- pseudonymous user ids ------------------------------------------------------------------------------------
def hash_user_id(user_id: str, salt: bytes) -> str:
    return hmac.new(salt, user_id.encode("utf-8"), hashlib.sha256).hexdigest()


def load_salt(salt_file: Path, env: Mapping[str, str] | None = None, record: bool = True) -> tuple[bytes, bool]:
    """(salt, created_now) of the workspace whose `.cl/` holds `salt_file`. The environment wins (the variable,
    then the file it names); otherwise the workspace file, created once with 32 random bytes.

    Every writer opens the workspace through here (the Recorder loads the salt first), so the workspace's
    secrets are checked here too: the salt and the encryption key must match the fingerprints recorded in
    `.cl/fingerprints.json`. With `record` (writers) the first use records them; readers pass record=False so
    that a wrong secret given to a read-only command is never pinned as the workspace's."""
    salt, created = _load_salt(Path(salt_file), secret_env(env))
    check_secrets(Path(salt_file).parent, salt, secret_env(env), record)
    return salt, created


def _load_salt(salt_file: Path, env: Mapping[str, str]) -> tuple[bytes, bool]:
    if env.get(SALT_ENV):
        return env[SALT_ENV].encode("utf-8"), False
    if env.get(SALT_FILE_ENV):
        return read_secret_file(Path(env[SALT_FILE_ENV]), SALT_FILE_ENV).encode("utf-8"), False
    existing = _read_salt(salt_file)
    if existing is not None:
        return existing, False
    salt_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    salt = secrets.token_bytes(SALT_BYTES)
    if _create_exclusive(salt_file, salt):
        return salt, True
    # Another process created it first: everyone uses that salt.
    existing = _read_salt(salt_file, wait_s=2.0)
    if existing is None:
        raise ConfigError(f"{salt_file}: could not read the user-hash salt", f"check the file or set {SALT_ENV}")
    return existing, False


def _read_salt(salt_file: Path, wait_s: float = 0.0) -> bytes | None:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            salt = salt_file.read_bytes()
        except FileNotFoundError:
            return None
        if salt:
            return salt
        if time.monotonic() >= deadline:
            raise ConfigError(f"{salt_file}: the user-hash salt file is empty", f"delete it or set {SALT_ENV}")
        time.sleep(0.02)  # a writer without hard-link support may still be filling it


def _create_exclusive(salt_file: Path, salt: bytes) -> bool:
    """Write a private temp file, then hard-link it into place: the salt appears complete or not at all."""
    tmp = salt_file.with_name(f".{salt_file.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    _write_new(tmp, salt)
    try:
        os.link(tmp, salt_file)
        return True
    except FileExistsError:
        return False
    except OSError:  # filesystem without hard links
        try:
            _write_new(salt_file, salt)
            return True
        except FileExistsError:
            return False
    finally:
        tmp.unlink(missing_ok=True)


def _write_new(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def workspace_secret(path: Path) -> bytes:
    """A random secret of this workspace (e.g. the service's feedback-token key), created once, 0600."""
    existing = _read_salt(path)
    if existing is not None:
        return existing
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    secret = secrets.token_bytes(SALT_BYTES)
    if _create_exclusive(path, secret):
        return secret
    existing = _read_salt(path, wait_s=2.0)  # another process created it first
    if existing is None:
        raise ConfigError(f"{path}: could not read the workspace secret", "check the file, or delete it")
    return existing


# --- secret files ---------------------------------------------------------------------------------------------
def read_secret_file(path: Path, variable: str) -> str:
    """The secret in a file that only its owner may read; refused when others could (mode must be 0600 or 0400)."""
    try:
        info = path.stat()
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"{variable}: cannot read {path} ({exc.strerror or exc})",
                          "point it at a readable file, or unset it") from None
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise ConfigError(f"{variable}: {path} can be read by other users (mode {stat.S_IMODE(info.st_mode):o})",
                          f"run: chmod 600 {path}")
    if not text:
        raise ConfigError(f"{variable}: {path} is empty", "write the secret into it, or unset the variable")
    return text


def write_secret_file(path: Path, secret: str) -> Path:
    """Write a secret into a new 0600 file (its folder 0700), replacing an earlier one atomically."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    _write_new(tmp, secret.encode("utf-8") + b"\n")
    os.replace(tmp, path)
    return path


def encryption_key(env: Mapping[str, str] | None = None) -> str | None:
    """The configured Fernet key text (the variable, then the file it names), or None when encryption is off."""
    env = secret_env(env)
    if (env.get(KEY_ENV) or "").strip():
        return env[KEY_ENV].strip()
    if env.get(KEY_FILE_ENV):
        return read_secret_file(Path(env[KEY_FILE_ENV]), KEY_FILE_ENV)
    return None


# --- fingerprints ---------------------------------------------------------------------------------------------
def fingerprint(kind: str, secret: bytes) -> str:
    return hmac.new(secret, f"cl workspace {kind} fingerprint".encode(), hashlib.sha256).hexdigest()[:24]


def recorded_fingerprints(cl_dir: Path) -> dict:
    try:
        doc = orjson.loads((cl_dir / FINGERPRINTS).read_bytes())
    except FileNotFoundError:
        return {}
    except orjson.JSONDecodeError:
        raise ConfigError(f"{cl_dir / FINGERPRINTS} is not valid JSON",
                          "restore it from a backup; deleting it turns off the salt and key checks") from None
    return doc if isinstance(doc, dict) else {}


def pin(cl_dir: Path, kind: str, secret: bytes, mismatch: SecretMismatch) -> bool:
    """Record the secret's fingerprint on first use; raise `mismatch` when another one is recorded.
    Returns True when this call recorded it."""
    from .store import atomic_write_json, workspace_lock

    mine = fingerprint(kind, secret)
    known = recorded_fingerprints(cl_dir).get(kind)
    if known is not None:
        if not hmac.compare_digest(known, mine):
            raise mismatch
        return False
    with workspace_lock(cl_dir / "locks", "fingerprints", wait=10.0):
        doc = recorded_fingerprints(cl_dir)
        if doc.get(kind) is None:
            atomic_write_json(cl_dir / FINGERPRINTS, {**doc, kind: mine})
            return True
    if not hmac.compare_digest(doc[kind], mine):  # another process recorded a different one meanwhile
        raise mismatch
    return False


def salt_mismatch() -> SecretMismatch:
    return SecretMismatch(
        "the user-id salt differs from the one this workspace's data was written with: user ids would not match "
        "(cl forget would find nothing)",
        f"unset {SALT_ENV}/{SALT_FILE_ENV} to use the workspace's .cl/user_hash_salt, or set the original salt")


def key_mismatch() -> SecretMismatch:
    return SecretMismatch(
        f"{KEY_ENV} is not the key this workspace's texts are encrypted with: mixing two keys would leave texts "
        "that nothing can decrypt", f"set {KEY_ENV} (or {KEY_FILE_ENV}) to the workspace's key")


def key_missing() -> SecretMismatch:
    return SecretMismatch(f"this workspace's texts are encrypted, but {KEY_ENV} is not set: new texts would be "
                          "stored in clear", f"set {KEY_ENV} (or {KEY_FILE_ENV}) to the workspace's key")


def check_secrets(cl_dir: Path, salt: bytes, env: Mapping[str, str], record: bool) -> None:
    """The salt and the key against the workspace's fingerprints (recorded on first use when `record`)."""
    check(cl_dir, "user_hash_salt", salt, salt_mismatch(), record)
    key = encryption_key(env)
    if key is None:
        if record and recorded_fingerprints(cl_dir).get("encryption_key"):
            raise key_missing()
        return
    from .crypto import Cipher

    Cipher(key)  # a malformed key is refused before anything could pin it
    check(cl_dir, "encryption_key", key.encode("utf-8"), key_mismatch(), record)


def check(cl_dir: Path, kind: str, secret: bytes, mismatch: SecretMismatch, record: bool) -> None:
    if record:
        pin(cl_dir, kind, secret, mismatch)
        return
    known = recorded_fingerprints(cl_dir).get(kind)
    if known is not None and not hmac.compare_digest(known, fingerprint(kind, secret)):
        raise mismatch


def workspace_salt(settings, record: bool = False) -> bytes:
    """The workspace's salt, checked against its fingerprint (read-only callers: nothing is recorded)."""
    return load_salt(settings.salt_file, record=record)[0]


def secrets_problem(settings, env: Mapping[str, str] | None = None) -> str | None:
    """Why turns cannot be recorded with the configured salt and key right now (for health checks), or None."""
    from ..core.errors import CLError

    env = secret_env(env)
    try:
        salt, _ = _load_salt(settings.salt_file, env)
        check_secrets(settings.salt_file.parent, salt, env, record=False)
        if encryption_key(env) is None and recorded_fingerprints(settings.salt_file.parent).get("encryption_key"):
            raise key_missing()
    except CLError as exc:
        return exc.message
    return None
