"""Background jobs of the service: curate and train (curate -> train -> eval -> gate) off the request path.

One learning job runs at a time; each has an id and a status the admin API reports. Jobs live in memory: what
they produce (snapshots, adapters, promotions) is in the registry and the learning-events log.
"""
from __future__ import annotations

import threading
import traceback
from dataclasses import dataclass, field
from typing import Any

from ..core.errors import CLError, NothingToDo
from ..core.records import new_id, utc_now
from ..core.settings import Settings
from ..storage.store import workspace_lock
from .workflow import TRAIN_KNOBS, LoopCancelled, LoopOptions, NoEvents, run_loop, train_settings

FINISHED = ("succeeded", "failed", "nothing_to_do", "cancelled")
__all__ = ["TRAIN_KNOBS", "Job", "JobConflict", "JobManager", "probe_lock", "train_settings"]


class JobConflict(CLError):
    """A learning job is already running."""


@dataclass
class Job:
    kind: str
    options: dict
    id: str = field(default_factory=new_id)
    status: str = "queued"
    created_at: str = field(default_factory=utc_now)
    started_at: str | None = None
    finished_at: str | None = None
    stage: str | None = None
    result: Any = None
    error: str | None = None

    def to_dict(self) -> dict:
        return {
            "id": self.id, "object": "job", "kind": self.kind, "status": self.status, "stage": self.stage,
            "options": self.options, "created_at": self.created_at, "started_at": self.started_at,
            "finished_at": self.finished_at, "result": self.result, "error": self.error,
        }


def probe_lock(settings: Settings, name: str) -> None:
    """Raise LockHeldError now (rather than inside the job) when another process holds the workspace lock."""
    with workspace_lock(settings.lock_dir, name):
        pass


class _JobEvents(NoEvents):
    """The job's stage follows the loop; the service's shutdown cancels it."""

    def __init__(self, manager: JobManager, job: Job):
        self.manager, self.job = manager, job

    def started(self, stage: str) -> None:
        self.manager._set(self.job, stage=stage)

    def cancelled(self) -> bool:
        return self.manager.cancel.is_set()


class JobManager:
    """Runs at most one learning job at a time, each in its own thread."""

    def __init__(self, settings: Settings, keep: int = 50):
        self.settings = settings
        self.keep = keep
        self.jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._threads: dict[str, threading.Thread] = {}
        self.cancel = threading.Event()

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self.jobs.get(job_id)

    def list(self) -> list[dict]:
        with self._lock:
            return [j.to_dict() for j in self.jobs.values()]

    def submit(self, kind: str, options: dict) -> Job:
        """Start a curate or train job; JobConflict / LockHeldError when one is already running."""
        with self._lock:
            busy = next((j for j in self.jobs.values() if j.status in ("queued", "running")), None)
            if busy is not None:
                raise JobConflict(f"a {busy.kind} job is already running (id {busy.id})",
                                  f"poll GET /admin/jobs/{busy.id}")
            for lock_name in ("curate", "train") if kind == "train" else ("curate",):
                probe_lock(self.settings, lock_name)
            job = Job(kind=kind, options=options)
            self.jobs[job.id] = job
            self._forget_old()
        thread = threading.Thread(target=self._run, args=(job,), name=f"cl-job-{kind}", daemon=True)
        self._threads[job.id] = thread
        thread.start()
        return job

    def _forget_old(self) -> None:
        finished = [j.id for j in self.jobs.values() if j.status in FINISHED]
        for job_id in finished[: max(0, len(self.jobs) - self.keep)]:
            self.jobs.pop(job_id, None)
            self._threads.pop(job_id, None)

    def _run(self, job: Job) -> None:
        self._set(job, status="running", started_at=utc_now())
        try:
            work = {"curate": self._curate, "train": self._train}[job.kind]
            result = work(job)
            outcome = {"status": "nothing_to_do" if _nothing_new(result) else "succeeded", "result": result}
        except BaseException as exc:  # noqa: BLE001 - a job failure must never take the service down
            outcome = _outcome(exc)
        self._set(job, **outcome, finished_at=utc_now(), stage=None)

    def _set(self, job: Job, **values: Any) -> None:
        with self._lock:
            for key, value in values.items():
                setattr(job, key, value)

    def _curate(self, job: Job) -> dict:
        options = LoopOptions.from_mapping({**job.options, "curate": True, "train": False, "evaluate": False})
        return run_loop(self.settings, options, _JobEvents(self, job))["curate"]

    def _train(self, job: Job) -> dict:
        """curate -> train -> eval -> gate, each on unless the request turned it off."""
        values = {"curate": True, "evaluate": True, "promote": True, **job.options, "train": True}
        options = LoopOptions.from_mapping(values)
        return run_loop(self.settings, options, _JobEvents(self, job))

    def shutdown(self, wait_s: float = 30.0) -> None:
        """Ask running jobs to stop at their next progress report and wait for them (a cut training is resumable)."""
        self.cancel.set()
        for thread in list(self._threads.values()):
            thread.join(timeout=wait_s)


def _outcome(exc: BaseException) -> dict:
    """Job status and error for an exception that ended a job."""
    if isinstance(exc, LoopCancelled):
        return {"status": "cancelled", "error": "the service shut down while the job ran"}
    if isinstance(exc, NothingToDo):
        return {"status": "nothing_to_do", "error": exc.message}
    if isinstance(exc, CLError):
        return {"status": "failed", "error": str(exc)}
    return {"status": "failed", "error": "".join(traceback.format_exception_only(type(exc), exc)).strip()}


def _nothing_new(result: Any) -> bool:
    if not isinstance(result, dict):
        return False
    manifest = result.get("curate", result)
    return isinstance(manifest, dict) and manifest.get("status") == "nothing_new"
