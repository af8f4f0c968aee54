"""`cl serve`: a local OpenAI-compatible service over the champion model.

Requests are queued (bounded) to ONE generation worker, the only thread that touches the model. Finished turns
go to ONE writer thread that records them through `ingest.Recorder` (sanitize -> append -> knowledge ->
counters), batching what arrives together; a response is sent only after its turn is on disk. The registry is
re-read (when it changed on disk) before every generation, so a promotion or rollback serves the next request.
Admin routes (curate, train, rollback, status, jobs) exist only when CL_ADMIN_TOKEN is set.
"""
from __future__ import annotations

import asyncio
import sys
import time
from contextlib import asynccontextmanager
from typing import Any

import orjson
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response, StreamingResponse

from ..capture.ingest import Recorder
from ..core.errors import CLError, ConfigError, InputError
from ..core.records import Interaction
from ..registry import rollback_champion
from ..storage.store import file_lock
from .schemas import (
    ApiError,
    ChatRequest,
    Completion,
    CurateRequest,
    FeedbackRequest,
    RollbackRequest,
    TrainRequest,
    api_error_for,
    check_bearer,
    error_body,
    error_response,
    host_name,
    json_response,
    model_label,
    model_list,
    origin_allowed,
)
from .worker import Service, Writer


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
        return await _complete(service, body)

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


async def _complete(service: Service, body: ChatRequest) -> Response:
    """One chat completion: submitted to the generation worker, answered whole or streamed, and recorded."""
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
    async def curate(body: CurateRequest | None = None, service: Service = Depends(_service)) -> Response:
        options = (body or CurateRequest()).model_dump()
        return _job_response(await run_in_threadpool(service.jobs.submit, "curate", options))

    @app.post("/admin/train")
    async def train(body: TrainRequest | None = None, service: Service = Depends(_service)) -> Response:
        options = (body or TrainRequest()).model_dump()
        return _job_response(await run_in_threadpool(service.jobs.submit, "train", options))

    @app.post("/admin/rollback")
    async def rollback(body: RollbackRequest | None = None, service: Service = Depends(_service)) -> Response:
        req = body or RollbackRequest()
        moved = await run_in_threadpool(rollback_champion, service.settings, req.steps, req.to, req.reason
                                        or "rollback via API")
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
