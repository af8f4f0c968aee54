"""The safe shape of every stored field that is not a sanitized text: ids, short labels, flags, text limits.

Texts go through the sanitizer; everything else a front end hands over is checked here, so that a session id
like "alice.smith@example.com-laptop" or a target tool like "John Smith 555-123-4567" never reaches the log:
- ids (session, adapter, A/B arm) keep a short charset; one that does not, or that looks personal, is stored as
  a keyed hash (same input, same hash: turns of one session stay together);
- labels (target tool, language, model) must be short and look like a label, else the turn is refused;
- flags (feedback.private, helpful) must be booleans; scores integers 1-5;
- free texts have length limits (privacy.max_text_chars for messages and corrections, privacy.max_comment_chars
  for comments): `check_feedback` and `check_turn` let a front end (the service) refuse before its writer thread.
Every refusal is an InputError that names the field and says what shape it needs.
"""
from __future__ import annotations

import hashlib
import hmac
import re
from typing import Any

from ..core.errors import InputError
from ..core.settings import PrivacyConfig

ID_SHAPE = re.compile(r"[A-Za-z0-9._:-]{1,64}")
LABEL_SHAPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._:/+#()-]{0,63}")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_DIGIT_RUN = re.compile(r"\d(?:[\s().+-]?\d){6}")
MAX_USER_ID_CHARS = 256  # never stored (only its keyed hash), but bounded
LABELS = ("target_tool", "language", "model")


def safe_id(value: Any, what: str, key: bytes) -> str | None:
    """`value` if it is a short id of harmless shape, else its keyed hash ("h-" + 24 hex digits)."""
    if value is None:
        return None
    text = _as_text(value, what, MAX_USER_ID_CHARS)
    if _UUID.fullmatch(text) or (ID_SHAPE.fullmatch(text) and not looks_personal(text)):
        return text
    return "h-" + hmac.new(key, f"{what}\x00{text}".encode(), hashlib.sha256).hexdigest()[:24]


def check_label(value: Any, what: str) -> str | None:
    """A short label such as "warehouse", "en" or "bundled:SmolLM2-135M-Instruct"; InputError otherwise."""
    if value is None:
        return None
    text = _as_text(value, what, 64).strip()
    if not text:
        return None
    if not LABEL_SHAPE.fullmatch(text):
        raise InputError(f"'{what}' must be a short label (letters, digits, space and . _ : / + # ( ) -, at most 64)")
    if looks_personal(text):
        raise InputError(f"'{what}' looks like personal data (a name, e-mail, phone number or secret), not a label")
    return text


def check_flag(value: Any, what: str) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise InputError(f"'{what}' must be true or false")
    return value


def check_text(value: Any, what: str, max_chars: int) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InputError(f"'{what}' must be a string")
    if len(value) > max_chars:
        raise InputError(f"'{what}' is longer than {max_chars} characters")
    return value


def check_feedback(feedback: Any, privacy: PrivacyConfig) -> None:
    """Types and limits of one feedback (score, helpful, private, comment, correction); InputError if wrong."""
    score = feedback.score
    if score is not None and (isinstance(score, bool) or not isinstance(score, int) or not 1 <= score <= 5):
        raise InputError("feedback score must be an integer from 1 to 5")
    check_flag(feedback.helpful, "helpful")
    check_flag(feedback.private, "private")
    check_text(feedback.comment, "comment", privacy.max_comment_chars)
    check_text(feedback.correction, "correction", privacy.max_text_chars)


def check_turn(turn: Any, privacy: PrivacyConfig, messages: bool = True) -> None:
    """Everything of a turn that is checked rather than sanitized; a front end may call this before queueing.
    `messages=False` leaves message lengths to the front end (the chat keeps long pasted questions)."""
    for name in LABELS:
        check_label(getattr(turn, name), name)
    for i, message in enumerate(turn.messages if messages else []):
        check_text(message.get("content"), f"messages[{i}].content", privacy.max_text_chars)
    check_feedback(turn.feedback, privacy)
    if turn.id is not None and not (isinstance(turn.id, str) and ID_SHAPE.fullmatch(turn.id)):
        raise InputError("'id' must be a short id (letters, digits and . _ : -, at most 64)")


def looks_personal(value: str) -> bool:
    """An e-mail sign, a phone-length digit run, a secret or a person's name (read with separators as spaces)."""
    from . import names, secret_scan

    if "@" in value or _DIGIT_RUN.search(value) or secret_scan.find_secrets(value):
        return True
    spaced = re.sub(r"[._:/+#()-]+", " ", value)
    return bool(names.find_names(spaced)) or bool(names.find_names(value))


def _as_text(value: Any, what: str, max_chars: int) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InputError(f"'{what}' must be a string")
    text = str(value)
    if len(text) > max_chars:
        raise InputError(f"'{what}' is longer than {max_chars} characters")
    return text
