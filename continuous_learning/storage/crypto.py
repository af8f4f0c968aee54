"""Opt-in encryption at rest of interaction texts (Fernet: AES-128-CBC + HMAC-SHA256, authenticated).

Set CL_ENCRYPTION_KEY to a Fernet key to turn it on; make one with
    python -c "from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())"
Only texts are sealed (messages[*].content, feedback.correction / feedback.comment); ids, timestamps,
user_hash and scores stay in clear so joins, forget and retention work without the key.
Plain strings (no marker) pass through unchanged, so logs written before encryption keep working.
"""
from __future__ import annotations

from typing import Any

from ..core.errors import CLError
from .keys import KEY_ENV as ENV_KEY

MARKER = "enc:v1:"
_MARKER_BYTES = MARKER.encode("ascii")
KEY_COMMAND = 'python -c "from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())"'
_FEEDBACK_TEXTS = ("correction", "comment")


class EncryptionError(CLError):
    exit_code = 2


class Cipher:
    """A Fernet key, loaded once."""

    def __init__(self, key: str):
        from cryptography.fernet import Fernet

        try:
            self._fernet = Fernet(key.strip().encode())
        except Exception:
            raise EncryptionError(f"{ENV_KEY} is not a valid Fernet key", f"make one with: {KEY_COMMAND}") from None

    def encrypt(self, text: str) -> str:
        return MARKER + self._fernet.encrypt(text.encode("utf-8")).decode("ascii")

    def decrypt(self, token: str) -> str:
        from cryptography.fernet import InvalidToken

        try:
            return self._fernet.decrypt(token.encode("ascii")).decode("utf-8")
        except (InvalidToken, ValueError, UnicodeError):
            raise _cannot_decrypt() from None


def _cannot_decrypt() -> EncryptionError:
    return EncryptionError(f"cannot decrypt encrypted interaction texts: wrong or missing {ENV_KEY}",
                           f"set {ENV_KEY} to the key the data was written with")


def cipher_from_env(env: Any = None) -> Cipher | None:
    """The cipher for CL_ENCRYPTION_KEY (or the 0600 file CL_ENCRYPTION_KEY_FILE names), or None when encryption
    is off. Writers also check the key against the workspace's fingerprint (keys.load_salt)."""
    from .keys import encryption_key

    key = encryption_key(env)
    return Cipher(key) if key else None


def is_sealed(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(MARKER)


def encrypt_text(cipher: Cipher | None, text: Any) -> Any:
    """Seal one text; without a cipher, or for non-strings and already-sealed texts, return it unchanged."""
    if cipher is None or not isinstance(text, str) or is_sealed(text):
        return text
    return cipher.encrypt(text)


def decrypt_text(cipher: Cipher | None, value: Any) -> Any:
    """Open one text; plain strings pass through. A sealed text without the right key raises EncryptionError."""
    if not is_sealed(value):
        return value
    if cipher is None:
        raise _cannot_decrypt()
    return cipher.decrypt(value[len(MARKER):])


def _map_texts(record: Any, fn) -> Any:
    """A copy of an interaction / feedback-event / snapshot-example record with fn applied to its texts."""
    if not isinstance(record, dict):
        return record
    out = dict(record)
    messages = record.get("messages")
    if isinstance(messages, list):
        out["messages"] = [
            {**m, "content": fn(m["content"])} if isinstance(m, dict) and "content" in m else m for m in messages
        ]
    feedback = record.get("feedback")
    if isinstance(feedback, dict):
        out["feedback"] = {k: fn(v) if k in _FEEDBACK_TEXTS else v for k, v in feedback.items()}
    return out


def seal_messages(record: Any, cipher: Cipher | None) -> Any:
    """Encrypt the texts of one record (unchanged when encryption is off)."""
    if cipher is None:
        return record
    return _map_texts(record, lambda v: encrypt_text(cipher, v))


def may_hold_sealed(raw: bytes) -> bool:
    """False when the JSON line `raw` cannot hold a sealed text: the marker is plain ASCII, so a sealed string shows
    it verbatim unless the writer escaped plain characters (`\\u`, which this tool never writes). Readers of big
    logs skip `open_messages` on such lines."""
    return _MARKER_BYTES in raw or b"\\u" in raw


def open_messages(record: Any, cipher: Cipher | None) -> Any:
    """Decrypt the texts of one record; records with no sealed text come back as they are."""
    if not _has_sealed(record):
        return record
    return _map_texts(record, lambda v: decrypt_text(cipher, v))


def _has_sealed(record: Any) -> bool:
    if not isinstance(record, dict):
        return False
    messages = record.get("messages")
    if isinstance(messages, list) and any(isinstance(m, dict) and is_sealed(m.get("content")) for m in messages):
        return True
    feedback = record.get("feedback")
    return isinstance(feedback, dict) and any(is_sealed(feedback.get(k)) for k in _FEEDBACK_TEXTS)
