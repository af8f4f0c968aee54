"""The threads behind `cl serve`: ONE generation worker (the only thread that touches the model), ONE writer
that records finished turns through `capture.ingest.Recorder`, the registry view they share, and the
`Service` that holds them together with the jobs and counters."""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import os
import queue
import sys
import threading
import time
from typing import Any

from .. import registry
from ..capture.fields import check_feedback
from ..capture.ingest import Recorder, Turn, record_generation
from ..chat.models import ChatModel, GenerationStats, RepetitionControl
from ..core.errors import CLError, ConfigError, InputError
from ..core.records import Interaction
from ..core.settings import Settings
from ..loop.jobs import JobManager
from ..monitor.status import collect_status
from ..registry import adapters_by_version
from ..storage import keys
from ..storage.crypto import cipher_from_env
from ..storage.keys import secrets_problem
from ..storage.store import find_joined
from .schemas import (
    ApiError,
    ChatRequest,
    Completion,
    FeedbackRequest,
    FeedbackTokens,
    StopScanner,
    allowed_hosts,
    check_bearer,
    model_label,
    resolve_model,
    retry_after_s,
)


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
            _settle(task[2], lambda fn=fn, args=args: fn(self.recorder, *args))
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
            raise ApiError(400, f"the prompt takes {prompt_tokens} tokens; with max_tokens {job.max_tokens} that "
                                f"exceeds "
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
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# --- the service -----------------------------------------------------------------------------------------
class Service:
    """Everything a running server holds: settings, model worker, writer, jobs, counters."""

    def __init__(self, settings: Settings, chat: ChatModel, admin_token: str | None = None):
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
    def load(cls, settings: Settings, admin_token: str | None = None) -> Service:
        """Load the model and the sanitizer. `admin_token` None = take it from CL_ADMIN_TOKEN ('' = admin off)."""
        token = admin_token if admin_token is not None else keys.admin_token()
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

    def feedback_refusal(self, body: FeedbackRequest, authorization: str | None) -> ApiError | None:
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
            "candidates": [a.version for a in adapters_by_version(doc) if a.status == "candidate"],
            "adapters": {a.version: a.status for a in adapters_by_version(doc)},
            "snapshots": len(doc["snapshots"]),
            "queue": {"depth": self.worker.depth, "waiting": self.worker.queue.qsize(),
                      "capacity": self.settings.serve.queue_size},
            "jobs": self.jobs.list(), "counts": dict(self.counts), "uptime_s": round(time.time() - self.started, 1),
            "workspace": collect_status(self.settings),  # the same data as `cl status --json`
        }
