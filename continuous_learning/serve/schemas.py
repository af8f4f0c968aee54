"""The OpenAI-compatible shapes of `cl serve`: errors, request models, the model list, stop-sequence
scanning, host and token checks. Pure: no threads, no model, no files."""
from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import math
import threading
from dataclasses import dataclass, field
from dataclasses import fields as dataclass_fields
from typing import Any, Literal, get_type_hints
from urllib.parse import urlsplit

import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, create_model
from starlette.responses import Response

from ..chat.models import RepetitionControl
from ..core.errors import (
    CLError,
    ConfigError,
    InputError,
    LockHeldError,
    ModelNotFoundError,
    NothingToDo,
    RegistryError,
)
from ..core.records import Feedback, new_id
from ..core.settings import Settings
from ..loop.jobs import JobConflict
from ..loop.workflow import TRAIN_KNOBS, LoopOptions
from ..registry import BASE, adapter_view, serving_adapters
from ..storage.keys import workspace_secret

CHAMPION = "champion"
LOOPBACK = {"127.0.0.1", "::1", "localhost"}
FEEDBACK_KEY_FILE = "serve_feedback_key"
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error",
               405: "invalid_request_error", 409: "conflict_error", 413: "invalid_request_error",
               422: "invalid_request_error", 503: "service_unavailable", 500: "server_error"}
MAX_STOP_CHARS = 200


# --- errors in OpenAI's shape ------------------------------------------------------------------------
class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.headers = status, message, code, param, headers or {}


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": param,
                      "code": code}}


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(data, option=orjson.OPT_NON_STR_KEYS), status_code=status,
                    media_type="application/json", headers=headers)


def error_response(exc: ApiError) -> Response:
    return json_response(error_body(exc.status, exc.message, exc.code, exc.param), exc.status, exc.headers)


def api_error_for(exc: CLError) -> ApiError:
    """The HTTP status a library refusal maps to."""
    text = str(exc)
    if isinstance(exc, (JobConflict, LockHeldError, NothingToDo, RegistryError)):
        return ApiError(409, text, "conflict")
    if isinstance(exc, (InputError, ConfigError)):
        return ApiError(400, text, "invalid_value")
    if isinstance(exc, ModelNotFoundError):
        return ApiError(503, text, "model_unavailable")
    return ApiError(500, text, "internal_error")


# --- pure helpers --------------------------------------------------------------------------------------
def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """The text before the earliest stop string, and whether one was found."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


class StopScanner:
    """Streams text while holding back any tail that could still grow into a stop string."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.buffer = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.buffer += piece
        text, hit = cut_at_stop(self.buffer, self.stops)
        if hit:
            self.stopped, self.buffer = True, ""
            return text
        safe = len(self.buffer) - self.hold
        out, self.buffer = (self.buffer[:safe], self.buffer[safe:]) if safe > 0 else ("", self.buffer)
        return out

    def finish(self) -> str:
        out, self.buffer = ("" if self.stopped else self.buffer), ""
        return out


def resolve_model(doc: dict, requested: str | None, base_name: str = "") -> str | None:
    """The adapter version a request's `model` names (None = the base model), or ApiError 404."""
    name = (requested or CHAMPION).strip()
    if name == CHAMPION:
        return doc.get("champion")
    if name in (BASE, base_name):
        return None
    entry = adapter_view(doc, name)
    if entry is None:
        known = ", ".join([CHAMPION, BASE, *usable_versions(doc)])
        raise ApiError(404, f"the model '{name}' does not exist; known models: {known}", "model_not_found", "model")
    if not entry.can_serve:
        raise ApiError(404, f"adapter {name} is {entry.status} and cannot serve", "model_not_found", "model")
    return name


def usable_versions(doc: dict) -> list[str]:
    return [a.version for a in serving_adapters(doc)]


def model_label(version: str | None) -> str:
    return version or BASE


def model_list(doc: dict, base_name: str, created: int) -> dict:
    """GET /v1/models: the champion alias, the base and every adapter that can serve."""
    def item(model_id: str, **extra: Any) -> dict:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "cl", **extra}

    champion = doc.get("champion")
    data = [item(CHAMPION, serves=model_label(champion)), item(BASE, base_model=base_name)]
    data += [item(a.version, status=a.status) for a in serving_adapters(doc)]
    return {"object": "list", "data": data}


def retry_after_s(waiting: int, mean_latency_s: float) -> int:
    """Seconds a rejected client should wait: roughly the time to drain what is queued."""
    return max(1, math.ceil(waiting * max(mean_latency_s, 0.05)))


def check_bearer(authorization: str | None, token: str) -> int | None:
    """None when the header carries the token; else 401 (missing) or 403 (wrong). Constant-time comparison."""
    scheme, _, value = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return 401
    return None if hmac.compare_digest(value.strip().encode(), token.encode()) else 403


def is_loopback(host: str) -> bool:
    return host in LOOPBACK or host.startswith("127.")


def host_name(header: str | None) -> str | None:
    """The host of a Host header ('127.0.0.1:8000' -> '127.0.0.1', '[::1]:8000' -> '::1'), or None if malformed."""
    if not header or any(c.isspace() or c in "/?#@" for c in header):
        return None
    try:
        parts = urlsplit("//" + header)
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        return None
    return parts.hostname


def allowed_hosts(settings: Settings) -> set[str]:
    """The configured names plus the address bound to (unless it is a wildcard such as 0.0.0.0)."""
    names = {h.strip().lower().strip("[]") for h in settings.serve.allowed_hosts if h.strip()}
    bound = settings.serve.host.strip().lower().strip("[]")
    return names | ({bound} if bound not in ("", "0.0.0.0", "::") else set())


def origin_allowed(origin: str, host_header: str, allowed: list[str]) -> bool:
    """A browser Origin may call the API only when configured, or when it is this very server (same origin)."""
    if origin == "null":
        return False
    normal = origin.rstrip("/").lower()
    if normal in {o.rstrip("/").lower() for o in allowed}:
        return True
    return urlsplit(normal).netloc == host_header.lower()


class FeedbackTokens:
    """Per-interaction tokens handed out with each completion: only a client that received an answer can rate it.

    token = HMAC-SHA256(workspace secret, interaction id), so nothing is stored and tokens survive restarts."""

    def __init__(self, secret: bytes):
        self.secret = secret

    @classmethod
    def of(cls, settings: Settings) -> FeedbackTokens:
        return cls(workspace_secret(settings.lock_dir.parent / FEEDBACK_KEY_FILE))

    def mint(self, interaction_id: str) -> str:
        digest = hmac.new(self.secret, f"feedback:{interaction_id}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest[:24]).decode("ascii")

    def valid(self, interaction_id: str, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(self.mint(interaction_id).encode(), str(token).encode())


# --- request schemas -------------------------------------------------------------------------------------
class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = Field(CHAMPION, max_length=200)
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=10)  # extension: llama.cpp's repeat_penalty (1 = off)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    n: int = Field(1, ge=1, le=1)
    seed: int | None = None

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise ApiError(422, "'stop' takes at most 4 strings", "invalid_value", "stop")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ApiError(422, f"a 'stop' string is longer than {MAX_STOP_CHARS} characters", "invalid_value", "stop")
        return stops


class FeedbackRequest(BaseModel):
    """Every field checked here, before anything reaches the writer thread (types, ranges, lengths)."""

    model_config = ConfigDict(extra="forbid")
    interaction_id: StrictStr = Field(min_length=1, max_length=100)
    feedback_token: StrictStr | None = Field(None, max_length=100)
    score: StrictInt | None = Field(None, ge=1, le=5)
    helpful: StrictBool | None = None
    comment: StrictStr | None = None
    correction: StrictStr | None = None
    private: StrictBool | None = None
    user: StrictStr | None = Field(None, max_length=256)

    def feedback(self) -> Feedback:
        return Feedback(score=self.score, helpful=self.helpful, comment=self.comment, correction=self.correction,
                        private=self.private)

    def check_lengths(self, max_chars: int) -> None:
        for name in ("comment", "correction"):
            value = getattr(self, name)
            if value is not None and len(value) > max_chars:
                raise ApiError(422, f"{name}: longer than {max_chars} characters (privacy.max_text_chars)",
                               "string_too_long", name)


def loop_request_fields(names: tuple[str, ...], **defaults: Any) -> dict[str, Any]:
    """Request fields for these LoopOptions fields: the option's type, default, limits and help text."""
    by_name = {f.name: f for f in dataclass_fields(LoopOptions)}
    hints = get_type_hints(LoopOptions)
    result: dict[str, Any] = {}
    for name in names:
        meta = by_name[name].metadata
        kind = Literal[meta["choices"]] | None if "choices" in meta else hints[name]
        limits = {k: meta[k] for k in ("ge", "gt", "max_length") if k in meta}
        result[name] = (kind, Field(defaults.get(name, by_name[name].default), description=meta["help"], **limits))
    return result


_STRICT = ConfigDict(extra="forbid")
CurateRequest = create_model("CurateRequest", __config__=_STRICT,
                             **loop_request_fields(("full", "include_unrated", "note")))
TrainRequest = create_model(
    "TrainRequest", __base__=CurateRequest,
    **loop_request_fields(("curate", "evaluate", "promote", "snapshot", "fresh", *TRAIN_KNOBS),
                          curate=True, evaluate=True))


class RollbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    steps: int = Field(1, ge=1)
    to: str | None = None
    reason: str = Field("", max_length=1000)



@dataclass
class Completion:
    """One chat completion on its way through the worker. Events go back to the request's event loop."""

    messages: list[dict]
    model: str
    max_tokens: int
    temperature: float
    top_p: float
    stops: list[str]
    user: str | None
    seed: int | None
    stream: bool
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    repetition: RepetitionControl = field(default_factory=RepetitionControl)
    id: str = field(default_factory=new_id)
    stop_flag: threading.Event = field(default_factory=threading.Event)
    done: bool = False

    def emit(self, kind: str, **data: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, data))
        except RuntimeError:  # the request's loop is gone (shutdown); the turn is still recorded
            pass
