"""`cl serve`: a local OpenAI-compatible service over the champion model.

Requests are queued (bounded) to ONE generation worker, the only thread that touches the model. Finished turns
go to ONE writer thread that records them through `ingest.Recorder` (sanitize -> append -> knowledge ->
counters), batching what arrives together; a response is sent only after its turn is on disk. The registry is
re-read (when it changed on disk) before every generation, so a promotion or rollback serves the next request.
Admin routes (curate, train, rollback, status, jobs) exist only when CL_ADMIN_TOKEN is set.
"""
from __future__ import annotations

import asyncio
import base64
import collections
import concurrent.futures
import hashlib
import hmac
import math
import os
import queue
import sys
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union
from urllib.parse import urlsplit

import orjson
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response, StreamingResponse

from . import registry
from .crypto import cipher_from_env
from .decisions import BASE, UNUSABLE, rollback_champion, sorted_versions
from .errors import CLError, ConfigError, InputError, LockHeldError, ModelNotFoundError, NothingToDo, RegistryError
from .fields import check_feedback
from .ingest import Recorder, Turn, record_generation
from .jobs import JobConflict, JobManager
from .keys import secrets_problem, workspace_secret
from .models import ChatModel, GenerationStats, RepetitionControl
from .monitor import collect_status
from .records import Feedback, Interaction, new_id
from .settings import Settings
from .store import file_lock, find_joined

CHAMPION = "champion"
LOOPBACK = {"127.0.0.1", "::1", "localhost"}
ADMIN_TOKEN_ENV = "CL_ADMIN_TOKEN"
FEEDBACK_KEY_FILE = "serve_feedback_key"
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
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
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": param, "code": code}}


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
    entry = doc["adapters"].get(name)
    if entry is None:
        known = ", ".join([CHAMPION, BASE, *usable_versions(doc)])
        raise ApiError(404, f"the model '{name}' does not exist; known models: {known}", "model_not_found", "model")
    if entry["status"] in UNUSABLE:
        raise ApiError(404, f"adapter {name} is {entry['status']} and cannot serve", "model_not_found", "model")
    return name


def usable_versions(doc: dict) -> list[str]:
    return [v for v in sorted_versions(doc) if doc["adapters"][v]["status"] not in UNUSABLE]


def model_label(version: str | None) -> str:
    return version or BASE


def model_list(doc: dict, base_name: str, created: int) -> dict:
    """GET /v1/models: the champion alias, the base and every adapter that can serve."""
    def item(model_id: str, **extra: Any) -> dict:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "cl", **extra}

    champion = doc.get("champion")
    data = [item(CHAMPION, serves=model_label(champion)), item(BASE, base_model=base_name)]
    data += [item(v, status=doc["adapters"][v]["status"]) for v in usable_versions(doc)]
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
    def of(cls, settings: Settings) -> "FeedbackTokens":
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
    content: Union[str, list[TextPart]]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = Field(CHAMPION, max_length=200)
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    repetition_penalty: Optional[float] = Field(None, gt=0, le=10)  # extension: llama.cpp's repeat_penalty (1 = off)
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = Field(None, max_length=256)
    n: int = Field(1, ge=1, le=1)
    seed: Optional[int] = None

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
    feedback_token: Optional[StrictStr] = Field(None, max_length=100)
    score: Optional[StrictInt] = Field(None, ge=1, le=5)
    helpful: Optional[StrictBool] = None
    comment: Optional[StrictStr] = None
    correction: Optional[StrictStr] = None
    private: Optional[StrictBool] = None
    user: Optional[StrictStr] = Field(None, max_length=256)

    def feedback(self) -> Feedback:
        return Feedback(score=self.score, helpful=self.helpful, comment=self.comment, correction=self.correction,
                        private=self.private)

    def check_lengths(self, max_chars: int) -> None:
        for name in ("comment", "correction"):
            value = getattr(self, name)
            if value is not None and len(value) > max_chars:
                raise ApiError(422, f"{name}: longer than {max_chars} characters (privacy.max_text_chars)",
                               "string_too_long", name)


class CurateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    full: bool = False
    include_unrated: Optional[bool] = None
    note: Optional[str] = Field(None, max_length=1000)


class TrainRequest(CurateRequest):
    curate: bool = True
    evaluate: bool = True
    promote: bool = True
    snapshot: Optional[str] = None
    fresh: bool = False
    max_steps: Optional[int] = Field(None, ge=1)
    epochs: Optional[int] = Field(None, ge=0)
    learning_rate: Optional[float] = Field(None, gt=0)
    objective: Optional[Literal["auto", "sft", "kto", "dpo"]] = None


class RollbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    steps: int = Field(1, ge=1)
    to: Optional[str] = None
    reason: str = Field("", max_length=1000)


# --- the generation worker -------------------------------------------------------------------------------
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


class RegistryView:
    """The registry document, re-parsed only when the file changed (a rename gives it a new inode)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._key: tuple | None = None
        self._doc: dict = registry.empty_registry()

    def get(self) -> dict:
        try:
            st = os.stat(self.settings.registry_file)
            key = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            key = None
        if key != self._key:
            try:
                self._doc = registry.load(self.settings)
            except CLError as exc:  # keep serving what was good; the next change is picked up again
                print(f"warning: registry unreadable, keeping the previous one: {exc}", file=sys.stderr)
                return self._doc
            self._key = key
        return self._doc


class Writer:
    """The one thread that records: turns arriving together are sanitized and appended as one batch.

    It keeps the turns it recorded lately, so feedback needs no scan of the whole raw log. When the raw log is
    rewritten (`cl forget`, retention: a new file under the same name), everything cached is dropped at once (the
    thread looks at least once a second), so a forgotten user's turns are no longer held, and feedback on them is
    looked up in the rewritten log, where it finds nothing."""

    def __init__(self, settings: Settings, batch_max: int = 64):
        self.settings = settings
        self.recorder = Recorder(settings)
        self.batch_max = batch_max
        self.tasks: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._loop, name="cl-serve-writer", daemon=True)
        self.recent: collections.OrderedDict[str, Interaction] = collections.OrderedDict()
        self.recent_max = 10_000
        self.log_identity = self._identity()

    def _identity(self) -> tuple | None:
        try:
            st = os.stat(self.settings.raw_log)
        except FileNotFoundError:
            return None
        return st.st_dev, st.st_ino

    def notice_rewrites(self) -> bool:
        """Drop the cache when the raw log was replaced since it was filled. True when it was."""
        identity = self._identity()
        if identity == self.log_identity or (self.log_identity is None and not self.recent):
            self.log_identity = identity
            return False
        self.recent.clear()
        self.log_identity = identity
        return True

    def interaction(self, interaction_id: str) -> Interaction:
        """A logged interaction with its feedback so far (writer thread only, so the cache stays consistent)."""
        self.notice_rewrites()
        cached = self.recent.get(interaction_id)
        cached = cached or find_joined(self.settings.raw_log, interaction_id, cipher_from_env())
        if cached is None:
            raise InputError(f"no interaction with id {interaction_id}")
        return cached

    def remember(self, interaction: Interaction) -> None:
        if self.log_identity is None:
            self.log_identity = self._identity()
        self.recent[interaction.id] = interaction
        self.recent.move_to_end(interaction.id)
        while len(self.recent) > self.recent_max:
            self.recent.popitem(last=False)

    def warm_up(self) -> None:
        """Load Presidio now (failing with one clear error before the server starts), not on the first request."""
        self.recorder.sanitizer.sanitize_many(["warm up"])

    def start(self) -> None:
        self.thread.start()

    def record(self, turn: Turn, stats: GenerationStats) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self.tasks.put(("turn", (turn, stats), future))
        return future

    def call(self, fn, *args: Any) -> concurrent.futures.Future:
        """Run fn(recorder, *args) on the writer thread, in order with the turns."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self.tasks.put(("call", (fn, args), future))
        return future

    def close(self) -> None:
        self.tasks.put(None)
        self.thread.join()

    def _loop(self) -> None:
        while True:
            try:
                tasks = [self.tasks.get(timeout=1.0)]
            except queue.Empty:
                self.notice_rewrites()
                continue
            while len(tasks) < self.batch_max and not self.tasks.empty():
                tasks.append(self.tasks.get_nowait())
            closing = None in tasks
            self._run([t for t in tasks if t is not None])
            if closing:
                leftover = []
                while not self.tasks.empty():
                    task = self.tasks.get_nowait()
                    if task is not None:
                        leftover.append(task)
                self._run(leftover)
                return

    def _run(self, tasks: list) -> None:
        turns: list = []
        for task in tasks:
            if task[0] == "turn":
                turns.append(task)
                continue
            self._record_turns(turns)
            turns = []
            fn, args = task[1]
            _settle(task[2], lambda: fn(self.recorder, *args))
        self._record_turns(turns)

    def _record_turns(self, tasks: list) -> None:
        if not tasks:
            return
        try:
            recorded = self.recorder.record_turns([turn for _, (turn, _), _ in tasks])
            for interaction, (_, (turn, stats), _) in zip(recorded, tasks):
                record_generation(self.settings, interaction.id, stats, turn.model, turn.adapter_version)
        except BaseException as exc:  # noqa: BLE001 - every waiting request learns the turn was not stored
            for _, _, future in tasks:
                future.set_exception(exc)
            return
        for interaction, (_, _, future) in zip(recorded, tasks):
            self.remember(interaction)
            future.set_result(interaction)


def _settle(future: concurrent.futures.Future, work) -> None:
    try:
        future.set_result(work())
    except BaseException as exc:  # noqa: BLE001 - handed to the request that asked
        future.set_exception(exc)


class GenerationWorker:
    """The one thread that uses the model, fed by a bounded queue."""

    def __init__(self, settings: Settings, chat: ChatModel, writer: Writer):
        self.settings = settings
        self.chat = chat
        self.writer = writer
        self.registry = RegistryView(settings)
        self.queue: queue.Queue = queue.Queue(maxsize=settings.serve.queue_size)
        self.current: Completion | None = None
        self.mean_latency_s = 0.5
        self.thread = threading.Thread(target=self._loop, name="cl-serve-model", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def submit(self, job: Completion) -> None:
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            wait = retry_after_s(self.queue.qsize() + 1, self.mean_latency_s)
            raise ApiError(503, f"the server is busy ({self.queue.maxsize} requests waiting); retry in {wait} s",
                           "queue_full", headers={"Retry-After": str(wait)}) from None

    @property
    def depth(self) -> int:
        return self.queue.qsize() + (1 if self.current is not None else 0)

    def stop(self) -> None:
        """Finish what is queued and running, then end the thread."""
        self.queue.put(None)
        self.thread.join()

    def _loop(self) -> None:
        while True:
            job = self.queue.get()
            if job is None:
                return
            self.current = job
            try:
                self._serve(job)
            except BaseException as exc:  # noqa: BLE001 - one failed generation must not stop the service
                print(f"error: generation failed: {type(exc).__name__}: {exc}", file=sys.stderr)
                job.emit("error", status=500, message=f"generation failed: {type(exc).__name__}", code="internal_error")
            finally:
                job.done = True
                self.current = None

    def _prepare(self, job: Completion) -> list[dict]:
        """Select the adapter and fit the prompt; ApiError when the request cannot be served."""
        doc = self.registry.get()
        version = resolve_model(doc, job.model, self.chat.base.name)
        if version != self.chat.active:
            try:
                self.chat.serve_adapter(self.settings, doc, version)  # its files are checked against their sha256
            except CLError as exc:
                raise ApiError(503, f"cannot load adapter {version}: {exc}", "model_unavailable", "model") from None
        context = self.chat.fit_context(job.messages, job.max_tokens, self.settings.chat.context_tokens)
        prompt_tokens = int(self.chat.encode_chat(context).shape[-1])
        limit = self.settings.chat.context_tokens or self.chat.context_limit
        if prompt_tokens + job.max_tokens > limit:
            raise ApiError(400, f"the prompt takes {prompt_tokens} tokens; with max_tokens {job.max_tokens} that exceeds "
                                f"the context of {limit} tokens - shorten the messages or lower max_tokens",
                           "context_length_exceeded", "messages")
        return context

    def _serve(self, job: Completion) -> None:
        if job.stop_flag.is_set():  # the client left while waiting: nothing generated, nothing to record
            job.emit("error", status=499, message="client closed the request", code="cancelled")
            return
        try:
            context = self._prepare(job)
        except ApiError as exc:
            job.emit("error", status=exc.status, message=exc.message, code=exc.code, param=exc.param)
            return
        if job.seed is not None:
            import torch

            torch.manual_seed(job.seed)
        version = self.chat.active
        job.emit("start", model=model_label(version))
        answer, stats, hit_stop = self._generate(job, context)
        self.mean_latency_s = 0.8 * self.mean_latency_s + 0.2 * stats.latency_ms / 1000
        stats.truncated = stats.truncated and not hit_stop  # a stop string is a normal end, not a cut
        turn = Turn(
            messages=[*context, {"role": "assistant", "content": answer.strip()}], user_id=job.user,
            model=self.chat.base.name, adapter_version=version, prompt_tokens=stats.prompt_tokens,
            completion_tokens=stats.completion_tokens, latency_ms=round(stats.latency_ms, 1), truncated=stats.truncated,
            source="api", id=job.id,
        )
        recorded = self.writer.record(turn, stats)
        finish = "length" if stats.truncated and not stats.interrupted else "stop"
        job.emit("end", answer=answer, finish_reason=finish, recorded=recorded,
                 usage=usage(stats.prompt_tokens, stats.completion_tokens))

    def _generate(self, job: Completion, context: list[dict]) -> tuple[str, GenerationStats, bool]:
        """The answer (cut at the first stop string; streamed pieces sent as they come), its stats, and
        whether a stop string ended it."""
        stats, scanner, pieces = GenerationStats(), StopScanner(job.stops), []

        def keep(text: str) -> None:
            if text:
                pieces.append(text)
                if job.stream:
                    job.emit("delta", text=text)

        for piece in self.chat.stream(context, job.max_tokens, job.temperature, job.top_p, job.stop_flag, stats,
                                      repetition=job.repetition):
            keep(scanner.feed(piece))
            if scanner.stopped:
                job.stop_flag.set()  # generation ends at its next step; what it still yields is dropped
        keep(scanner.finish())
        return "".join(pieces), stats, scanner.stopped


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


# --- the service -----------------------------------------------------------------------------------------
class Service:
    """Everything a running server holds: settings, model worker, writer, jobs, counters."""

    def __init__(self, settings: Settings, chat: ChatModel, admin_token: str | None = None):
        if settings.serve.queue_size < 1:
            raise ConfigError(f"serve.queue_size must be at least 1, got {settings.serve.queue_size}")
        if settings.serve.max_tokens < 1:
            raise ConfigError(f"serve.max_tokens must be at least 1, got {settings.serve.max_tokens}")
        self.settings = settings
        self.chat = chat
        self.admin_token = admin_token or None
        self.writer = Writer(settings)  # its Recorder checks the salt and key against the workspace: fails here
        self.worker = GenerationWorker(settings, chat, self.writer)
        self.jobs = JobManager(settings)
        self.tokens = FeedbackTokens.of(settings)
        self.hosts = allowed_hosts(settings)
        self.closing = False
        self.started = time.time()
        self.counts = {"completions": 0, "failed": 0, "rejected": 0, "feedback": 0}

    @classmethod
    def load(cls, settings: Settings, admin_token: str | None = None) -> "Service":
        """Load the model and the sanitizer. `admin_token` None = take it from CL_ADMIN_TOKEN ('' = admin off)."""
        token = admin_token if admin_token is not None else os.environ.get(ADMIN_TOKEN_ENV)
        problem = secrets_problem(settings)  # a bad key or another salt: one clear error before the model loads
        if problem is not None:
            raise ConfigError(f"cannot record answers: {problem}", "fix CL_ENCRYPTION_KEY / CL_USER_HASH_SALT")
        service = cls(settings, ChatModel.load(settings), token)
        service.writer.warm_up()
        return service

    def start(self) -> None:
        self.writer.start()
        self.worker.start()

    def stop(self) -> None:
        """Finish queued generations, record every finished turn, stop background jobs."""
        self.closing = True
        if self.worker.thread.is_alive():
            self.worker.stop()
        if self.writer.thread.is_alive():
            self.writer.close()
        self.jobs.shutdown()

    def recording_problem(self) -> str | None:
        """Why a finished answer could not be recorded right now (bad key, another salt...), or None."""
        if not self.writer.thread.is_alive() and self.writer.thread.ident is not None:
            return "the recording thread has stopped"
        return secrets_problem(self.settings)

    def feedback_refusal(self, body: "FeedbackRequest", authorization: str | None) -> ApiError | None:
        """Why a feedback request may not be recorded, judged before the writer thread sees it."""
        body.check_lengths(self.settings.privacy.max_text_chars)
        try:
            check_feedback(body.feedback(), self.settings.privacy)  # the recorder's own limits, before its thread
        except InputError as exc:
            return ApiError(422, exc.message, "invalid_value")
        if body.feedback().is_empty():
            return ApiError(422, "give at least one of score, helpful, comment, correction, private", "invalid_value")
        if self.tokens.valid(body.interaction_id, body.feedback_token):
            return None
        if self.admin_token and check_bearer(authorization, self.admin_token) is None:
            return None
        return ApiError(403, "feedback needs the feedback_token returned with that completion (or the admin token)",
                        "invalid_feedback_token", "feedback_token")

    def new_completion(self, body: ChatRequest) -> Completion:
        max_chars = self.settings.privacy.max_text_chars
        messages = []
        for i, m in enumerate(body.messages):
            text = m.text()
            if len(text) > max_chars:
                raise ApiError(422, f"messages[{i}].content is longer than {max_chars} characters", "invalid_value",
                               f"messages.{i}.content")
            messages.append({"role": "system" if m.role == "developer" else m.role, "content": text})
        if not any(m["role"] == "user" for m in messages):
            raise ApiError(422, "'messages' needs at least one user message", "invalid_value", "messages")
        if messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.settings.chat.system_prompt})
        chat = self.settings.chat
        asked = body.max_completion_tokens or body.max_tokens or chat.max_new_tokens
        loop = asyncio.get_running_loop()
        return Completion(
            messages=messages, model=body.model, max_tokens=min(asked, self.settings.serve.max_tokens),
            temperature=chat.temperature if body.temperature is None else body.temperature,
            top_p=chat.top_p if body.top_p is None else body.top_p, stops=body.stops(), user=body.user, seed=body.seed,
            stream=body.stream, loop=loop, events=asyncio.Queue(),
            repetition=RepetitionControl.from_settings(chat).overridden(
                body.repetition_penalty, body.frequency_penalty, body.presence_penalty),
        )

    def status(self) -> dict:
        doc = self.worker.registry.get()
        return {
            "object": "status", "base_model": self.chat.base.name, "champion": model_label(doc.get("champion")),
            "serving": model_label(self.chat.active),
            "candidates": [v for v in sorted_versions(doc) if doc["adapters"][v]["status"] == "candidate"],
            "adapters": {v: doc["adapters"][v]["status"] for v in sorted_versions(doc)},
            "snapshots": len(doc["snapshots"]),
            "queue": {"depth": self.worker.depth, "waiting": self.worker.queue.qsize(), "capacity": self.settings.serve.queue_size},
            "jobs": self.jobs.list(), "counts": dict(self.counts), "uptime_s": round(time.time() - self.started, 1),
            "workspace": collect_status(self.settings),  # the same data as `cl status --json`
        }


# --- HTTP ------------------------------------------------------------------------------------------------
class BodyLimit:
    """Refuse request bodies over `limit` bytes with 413 before the app parses them."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._too_large(scope, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending its body
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self._too_large(scope, send)
            if not message.get("more_body"):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope, send) -> None:
        body = orjson.dumps(error_body(413, f"request body larger than {self.limit} bytes", "request_too_large"))
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def _validation_error(exc: RequestValidationError) -> ApiError:
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    if first.get("type") == "json_invalid":
        return ApiError(400, "the request body is not valid JSON", "invalid_json")
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    return ApiError(422, f"{param + ': ' if param else ''}{first.get('msg', 'invalid value')}", "invalid_value", param)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(_: Request, exc: ApiError) -> Response:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> Response:
        return error_response(_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> Response:
        return error_response(ApiError(exc.status_code, str(exc.detail), None))

    @app.exception_handler(CLError)
    async def _cl(_: Request, exc: CLError) -> Response:
        return error_response(api_error_for(exc))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> Response:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return error_response(ApiError(500, f"internal error: {type(exc).__name__}", "internal_error"))


def _service(request: Request) -> Service:
    return request.app.state.service


def admin_refusal(service: Service, authorization: str | None) -> ApiError | None:
    """Why an admin request is refused: 404 while no token is configured, 401 without one, 403 for a wrong one."""
    if not service.admin_token:
        return ApiError(404, "Not Found")
    refused = check_bearer(authorization, service.admin_token)
    if refused == 401:
        return ApiError(401, "admin routes need 'Authorization: Bearer <CL_ADMIN_TOKEN>'", "missing_token",
                        headers={"WWW-Authenticate": "Bearer"})
    if refused == 403:
        return ApiError(403, "wrong admin token", "invalid_token")
    return None


class HostGuard:
    """Answers only requests addressed to a Host name this service serves, and refuses browser requests from other
    origins. A web page cannot reach the API through DNS rebinding (its requests carry the page's host name) nor
    by posting across origins (they carry its Origin, or `Sec-Fetch-Site: cross-site`). Runs before anything else."""

    def __init__(self, app, hosts: set[str], origins: list[str]):
        self.app, self.hosts, self.origins = app, hosts, list(origins)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] in ("http", "websocket"):
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or []}
            refusal = self.refusal(headers)
            if refusal is not None:
                return await error_response(refusal)(scope, receive, send)
        await self.app(scope, receive, send)

    def refusal(self, headers: dict[str, str]) -> ApiError | None:
        host_header = headers.get("host", "")
        host = host_name(host_header)
        if host is None or host.lower() not in self.hosts:
            return ApiError(400, f"this service does not answer to the host name '{host_header[:100]}'; allowed: "
                                 f"{', '.join(sorted(self.hosts))} (serve.allowed_hosts)", "host_not_allowed")
        origin = headers.get("origin")
        if origin is not None and not origin_allowed(origin, host_header, self.origins):
            return ApiError(403, f"requests from the web origin '{origin[:100]}' are refused (serve.allowed_origins)",
                            "origin_not_allowed")
        if origin is None and headers.get("sec-fetch-site") == "cross-site":
            return ApiError(403, "cross-site browser requests are refused (serve.allowed_origins)",
                            "origin_not_allowed")
        return None


class AdminGate:
    """Checks the admin token before anything else (body parsing included) looks at an /admin request."""

    def __init__(self, app, service: Service):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and (scope.get("path") == "/admin" or scope.get("path", "").startswith("/admin/")):
            header = dict(scope.get("headers") or []).get(b"authorization")
            refusal = admin_refusal(self.service, header.decode("latin-1") if header is not None else None)
            if refusal is not None:
                return await error_response(refusal)(scope, receive, send)
        await self.app(scope, receive, send)


def _chunk(job: Completion, model: str, created: int, delta: dict, finish: str | None = None, **extra: Any) -> bytes:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    data = {"id": job.id, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": None, "choices": [choice], **extra}
    return b"data: " + orjson.dumps(data) + b"\n\n"


async def _next_event(job: Completion) -> tuple[str, dict]:
    try:
        return await job.events.get()
    except asyncio.CancelledError:
        job.stop_flag.set()  # the client left: stop generating; what was generated is still recorded
        raise


async def _stored(service: Service, end: dict) -> str | None:
    """Wait until the writer has the turn on disk; the reason when it could not be recorded."""
    try:
        await asyncio.wrap_future(end["recorded"])
        return None
    except Exception as exc:  # noqa: BLE001 - reported to the client as an error
        print(f"error: could not record a turn: {exc}", file=sys.stderr)
        service.counts["failed"] += 1
        return f"the answer could not be recorded: {exc}"


async def _sse(service: Service, job: Completion, model: str, include_usage: bool, token: str):
    created = int(time.time())
    try:
        yield _chunk(job, model, created, {"role": "assistant", "content": ""}, feedback_token=token)
        while True:
            kind, data = await _next_event(job)
            if kind == "delta":
                yield _chunk(job, model, created, {"content": data["text"]})
                continue
            if kind == "error":
                yield b"data: " + orjson.dumps(error_body(data["status"], data["message"], data.get("code"))) + b"\n\n"
            else:
                yield _chunk(job, model, created, {}, data["finish_reason"])
                if include_usage:
                    body = {"id": job.id, "object": "chat.completion.chunk", "created": created, "model": model,
                            "choices": [], "usage": data["usage"]}
                    yield b"data: " + orjson.dumps(body) + b"\n\n"
                problem = await _stored(service, data)
                if problem is None:
                    service.counts["completions"] += 1
                else:
                    yield b"data: " + orjson.dumps(error_body(503, problem, "not_recorded")) + b"\n\n"
            yield b"data: [DONE]\n\n"
            return
    finally:
        if not job.done:
            job.stop_flag.set()


class EventStream(StreamingResponse):
    """Server-sent events whose generator is closed as soon as a send fails (the client hung up), so its
    cleanup stops the generation at once instead of whenever the generator is garbage-collected."""

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            await self.body_iterator.aclose()


def create_app(service: Service) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI):
        await run_in_threadpool(service.start)
        yield
        await run_in_threadpool(service.stop)

    app = FastAPI(title="cl serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    _install_error_handlers(app)
    app.add_middleware(BodyLimit, limit=service.settings.serve.max_request_bytes)
    app.add_middleware(AdminGate, service=service)
    app.add_middleware(HostGuard, hosts=service.hosts, origins=service.settings.serve.allowed_origins)  # runs first

    @app.get("/healthz")
    async def healthz() -> Response:
        problem = await run_in_threadpool(service.recording_problem)
        if problem is not None:
            return json_response({"status": "error", "problem": problem, "busy": service.worker.depth}, 503)
        return json_response({"status": "closing" if service.closing else "ok", "busy": service.worker.depth})

    @app.get("/v1/models")
    async def list_models() -> Response:
        doc = await run_in_threadpool(service.worker.registry.get)
        return json_response(model_list(doc, service.chat.base.name, int(service.started)))

    @app.get("/v1/models/{model_id}")
    async def get_model(model_id: str) -> Response:
        doc = await run_in_threadpool(service.worker.registry.get)
        for item in model_list(doc, service.chat.base.name, int(service.started))["data"]:
            if item["id"] == model_id:
                return json_response(item)
        raise ApiError(404, f"the model '{model_id}' does not exist", "model_not_found", "model")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest) -> Response:
        if service.closing:
            raise ApiError(503, "the server is shutting down", "shutting_down", headers={"Retry-After": "5"})
        problem = await run_in_threadpool(service.recording_problem)
        if problem is not None:  # refuse now rather than generate an answer that cannot be recorded
            raise ApiError(503, f"answers cannot be recorded: {problem}", "not_recorded")
        job = service.new_completion(body)
        try:
            service.worker.submit(job)
        except ApiError:
            service.counts["rejected"] += 1
            raise
        kind, first = await _next_event(job)
        if kind == "error":
            service.counts["failed"] += 1
            raise ApiError(first["status"], first["message"], first.get("code"), first.get("param"))
        token = service.tokens.mint(job.id)
        headers = {"X-Interaction-Id": job.id, "X-Model-Version": first["model"], "X-Feedback-Token": token}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return EventStream(_sse(service, job, first["model"], include_usage, token), media_type="text/event-stream",
                               headers={**headers, "Cache-Control": "no-cache"})
        while kind != "end":
            kind, data = await _next_event(job)
            if kind == "error":
                service.counts["failed"] += 1
                raise ApiError(data["status"], data["message"], data.get("code"))
        problem = await _stored(service, data)
        if problem is not None:
            raise ApiError(503, problem, "not_recorded")
        service.counts["completions"] += 1
        return json_response({
            "id": job.id, "object": "chat.completion", "created": int(time.time()), "model": first["model"],
            "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": data["answer"].strip()},
                         "logprobs": None, "finish_reason": data["finish_reason"]}],
            "usage": data["usage"], "feedback_token": token,
        }, headers=headers)

    @app.post("/v1/feedback")
    async def feedback(body: FeedbackRequest, request: Request) -> Response:
        refusal = service.feedback_refusal(body, request.headers.get("authorization"))
        if refusal is not None:
            raise refusal
        try:
            event = await asyncio.wrap_future(service.writer.call(record_api_feedback, service.writer, body))
        except InputError as exc:
            raise ApiError(422, str(exc), "invalid_value") from None
        service.counts["feedback"] += 1
        return json_response({"object": "feedback", "id": event.id, "interaction_id": event.interaction_id,
                              "feedback": event.feedback.to_dict()}, 201)

    _admin_routes(app)
    return app


def record_api_feedback(recorder: Recorder, writer: Writer, body: FeedbackRequest):
    """On the writer thread, holding the raw log's append lock from the look-up to the append, so a forget (which
    rewrites the log under the same lock) cannot slip between them and have this write its user back."""
    with file_lock(writer.settings.raw_log):
        try:
            interaction = writer.interaction(body.interaction_id)
        except InputError:
            raise ApiError(404, f"no interaction with id {body.interaction_id}", "interaction_not_found",
                           "interaction_id") from None
        check_feedback_target(interaction, body, recorder)
        event = recorder.record_feedback(interaction, body.feedback(), user_id=body.user, source="api")
    interaction.feedback = interaction.feedback.merged(event.feedback)
    writer.remember(interaction)
    return event


def check_feedback_target(interaction: Interaction, body: FeedbackRequest, recorder: Recorder) -> None:
    """Feedback through the API is for answers this service gave, from the user they were given to."""
    if interaction.source != "api":
        raise ApiError(403, f"interaction {interaction.id} did not come from this service (source "
                            f"'{interaction.source}'): rate it with 'cl feedback'", "not_an_api_turn", "interaction_id")
    if body.user is not None and recorder.user_hash(body.user) != interaction.user_hash:
        raise ApiError(403, "feedback must come from the user the answer was given to", "wrong_user", "user")


def _job_response(job) -> Response:
    return json_response(job.to_dict(), 202, {"Location": f"/admin/jobs/{job.id}"})


def _admin_routes(app: FastAPI) -> None:
    @app.get("/admin/status")
    async def status(service: Service = Depends(_service)) -> Response:
        return json_response(await run_in_threadpool(service.status))

    @app.get("/admin/jobs/{job_id}")
    async def job_status(job_id: str, service: Service = Depends(_service)) -> Response:
        job = service.jobs.get(job_id)
        if job is None:
            raise ApiError(404, f"no job with id {job_id}", "job_not_found")
        return json_response(job.to_dict())

    @app.post("/admin/curate")
    async def curate(body: Optional[CurateRequest] = None, service: Service = Depends(_service)) -> Response:
        options = (body or CurateRequest()).model_dump()
        return _job_response(await run_in_threadpool(service.jobs.submit, "curate", options))

    @app.post("/admin/train")
    async def train(body: Optional[TrainRequest] = None, service: Service = Depends(_service)) -> Response:
        options = (body or TrainRequest()).model_dump()
        return _job_response(await run_in_threadpool(service.jobs.submit, "train", options))

    @app.post("/admin/rollback")
    async def rollback(body: Optional[RollbackRequest] = None, service: Service = Depends(_service)) -> Response:
        req = body or RollbackRequest()
        moved = await run_in_threadpool(rollback_champion, service.settings, req.steps, req.to, req.reason or "rollback via API")
        return json_response({"from": model_label(moved["from"]), "to": model_label(moved["to"]),
                              "seconds": round(moved["seconds"], 3)})


# --- running it ------------------------------------------------------------------------------------------
def bind_socket(host: str, port: int):
    """The listening socket, or a one-line error when the address is taken or invalid."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}",
                          "choose another --port (or stop what uses it)") from None
    return sock


def make_server(service: Service, log_level: str = "info", graceful_s: int = 60):
    """A uvicorn server for the service. SIGINT/SIGTERM: stop accepting, finish in-flight requests (up to
    `graceful_s`), record every finished turn, stop background jobs, return normally."""
    import uvicorn

    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            super().handle_exit(sig, frame)
            self._captured_signals.clear()  # the shutdown was graceful: return instead of re-raising the signal

    config = uvicorn.Config(create_app(service), log_level=log_level, timeout_graceful_shutdown=graceful_s,
                            lifespan="on", access_log=log_level in ("info", "debug"))
    return _Server(config)
