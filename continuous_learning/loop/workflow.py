"""The one curate -> train -> eval -> gate path: `run_loop(settings, options, events)`.

`cl curate --train --eval`, `cl train`, `python -m continuous_learning.pipeline`, the service's jobs and
`cl cycle` all call it. `LoopOptions` declares every option of the loop once (default and help text per field);
the pipeline's argparse flags, the jobs' training knobs and the service's request models are derived from it.
`Events` is the one way a running loop reports back (and is asked to stop); each stage's own callback is
translated into it here.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any, Protocol

from ..core.settings import Settings

CURATE, TRAIN, EVAL = "curate", "train", "eval"


def option(default: Any, help: str, **extra: Any) -> Any:
    """A LoopOptions field: its default, its help text and what the derived forms need (flag, knob, limits)."""
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True)
class LoopOptions:
    """What one run of the loop does. Every stage is optional; a stage that is off is skipped."""

    curate: bool = option(False, "Curate new logged turns into a training snapshot.")
    full: bool = option(False, "Curate: rebuild from all logs, ignoring the cursor.")
    include_unrated: bool | None = option(None, "Curate: also train on turns nobody rated.")
    train: bool = option(False, "Train an adapter on the new (or newest) snapshot.")
    evaluate: bool = option(False, "Evaluate the new adapter and promote it if better.", flag="--eval")
    promote: bool = option(True, "Eval: promote the new adapter when the gate says so.", flag="--no-promote",
                           flag_help="Eval: show the gate decision but never promote.")
    note: str | None = option(None, "A note stored with what this run creates.", max_length=1000)
    snapshot: str | None = option(None, "Train: the snapshot to train on when curate is off (default: the newest).")
    fresh: bool = option(False, "Train: start from the base model instead of the champion adapter.")
    resume: bool = option(False, "Train: continue the newest interrupted run from its last checkpoint.")
    max_steps: int | None = option(None, "Train: at most this many optimizer steps (train.max_steps).", knob=True,
                                   ge=1)
    epochs: int | None = option(None, "Train: passes over the snapshot (train.epochs).", knob=True, ge=0)
    learning_rate: float | None = option(None, "Train: peak learning rate (train.learning_rate).", knob=True, gt=0)
    objective: str | None = option(None, "Train: auto, sft, kto or dpo (train.objective).", knob=True,
                                   choices=("auto", "sft", "kto", "dpo"))

    @classmethod
    def from_mapping(cls, values: dict) -> LoopOptions:
        """Options from a dict (a request body); keys that are not options are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


TRAIN_KNOBS = tuple(f.name for f in fields(LoopOptions) if f.metadata.get("knob"))


def train_settings(settings: Settings, options: dict | LoopOptions) -> Settings:
    """The settings with the options' training knobs applied (validated by the trainer before heavy work)."""
    values = options if isinstance(options, dict) else {k: getattr(options, k) for k in TRAIN_KNOBS}
    knobs = {k: values[k] for k in TRAIN_KNOBS if values.get(k) is not None}
    return replace(settings, train=replace(settings.train, **knobs)) if knobs else settings


# --- events ----------------------------------------------------------------------------------------------
class Events(Protocol):
    """How a running loop reports back. `stage` is "curate", "train" or "eval"."""

    def started(self, stage: str) -> None: ...

    def status(self, stage: str, message: str) -> None: ...

    def progress(self, stage: str, done: int, total: int | None, detail: dict) -> None: ...

    def warning(self, stage: str, message: str) -> None: ...

    def finished(self, stage: str, result: dict, seconds: float) -> None: ...

    def cancelled(self) -> bool: ...


class NoEvents:
    """Hears nothing and never cancels."""

    def started(self, stage: str) -> None:
        pass

    def status(self, stage: str, message: str) -> None:
        pass

    def progress(self, stage: str, done: int, total: int | None, detail: dict) -> None:
        pass

    def warning(self, stage: str, message: str) -> None:
        pass

    def finished(self, stage: str, result: dict, seconds: float) -> None:
        pass

    def cancelled(self) -> bool:
        return False


class CollectingEvents(NoEvents):
    """Keeps every event as (kind, stage, payload), for callers that look afterwards (cycle, tests)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, Any]] = []

    def started(self, stage: str) -> None:
        self.events.append(("started", stage, None))

    def status(self, stage: str, message: str) -> None:
        self.events.append(("status", stage, message))

    def progress(self, stage: str, done: int, total: int | None, detail: dict) -> None:
        self.events.append(("progress", stage, (done, total)))

    def warning(self, stage: str, message: str) -> None:
        self.events.append(("warning", stage, message))

    def finished(self, stage: str, result: dict, seconds: float) -> None:
        self.events.append(("finished", stage, seconds))

    def stages(self, kind: str) -> list[str]:
        return [stage for k, stage, _ in self.events if k == kind]


class LoopCancelled(Exception):
    """The events said stop (the service shuts down); raised at the next progress report or between stages."""


# --- the loop --------------------------------------------------------------------------------------------
def run_loop(settings: Settings, options: LoopOptions, events: Events | None = None) -> dict:
    """Run the stages the options ask for, in order: curate -> train -> eval (with the gate).

    Returns {"curate": manifest, "train": registry entry, "eval": report} for the stages that ran; a curate
    that finds nothing new ends the run there. The eval file is checked before any expensive stage. Raises
    what the stages raise, or LoopCancelled when the events asked to stop."""
    events = events or NoEvents()
    settings = train_settings(settings, options)
    try:
        return _run_stages(settings, options, events)
    except LoopCancelled:
        raise
    except Exception as exc:
        if events.cancelled():  # a stage may wrap the cancel (training turns it into TrainingFailed)
            raise LoopCancelled("cancelled while the loop ran") from exc
        raise


def _run_stages(settings: Settings, options: LoopOptions, events: Events) -> dict:
    results: dict[str, Any] = {}
    if options.evaluate:
        from ..evaluate import check_eval_ready

        events.status(EVAL, check_eval_ready(settings))  # a bad keyword file fails now, not after training
    snapshot, version = options.snapshot, None
    if options.curate:
        results[CURATE] = _stage(events, CURATE, lambda: _curate(settings, options, events))
        if results[CURATE]["status"] != "created":
            return results
        snapshot = results[CURATE]["id"]
    if options.train:
        results[TRAIN] = _stage(events, TRAIN, lambda: _train(settings, options, snapshot, events))
        version = results[TRAIN]["version"]
    if options.evaluate:
        results[EVAL] = _stage(events, EVAL, lambda: _evaluate(settings, options, version, events))
    return results


def _stage(events: Events, stage: str, work: Callable[[], dict]) -> dict:
    _stop_if_cancelled(events)
    events.started(stage)
    started = time.perf_counter()
    result = work()
    events.finished(stage, result, time.perf_counter() - started)
    return result


def _stop_if_cancelled(events: Events) -> None:
    if events.cancelled():
        raise LoopCancelled("cancelled while the loop ran")


def _curate(settings: Settings, options: LoopOptions, events: Events) -> dict:
    from ..curate import run_curate

    def progress(phase: str, done: int, total: int | None) -> None:
        events.progress(CURATE, done, total, {"phase": phase})
        _stop_if_cancelled(events)

    return run_curate(settings, full=options.full, include_unrated=options.include_unrated, note=options.note,
                      progress=progress)


def _train(settings: Settings, options: LoopOptions, snapshot: str | None, events: Events) -> dict:
    from ..train import run_training

    def progress(event: dict) -> None:
        kind = event.get("event")
        if kind in ("step", "start"):
            events.progress(TRAIN, event.get("step", 0), event.get("total_steps"), event)
        elif kind == "warning":
            events.warning(TRAIN, event["message"])
        elif kind == "status":
            events.status(TRAIN, event["message"])
        _stop_if_cancelled(events)

    return run_training(settings, snapshot_id=snapshot, fresh=options.fresh, resume=options.resume,
                        note=options.note, progress=progress)


def _evaluate(settings: Settings, options: LoopOptions, version: str | None, events: Events) -> dict:
    from ..evaluate import evaluate_and_gate

    def progress(message: str) -> None:
        events.status(EVAL, message)
        _stop_if_cancelled(events)

    return evaluate_and_gate(settings, candidate=version, promote=options.promote, progress=progress)


def describe_curate(manifest: dict) -> str:
    """One line on a curate result."""
    if manifest["status"] != "created":
        return manifest["message"]
    counts = manifest["counts"]
    return (f"snapshot {manifest['id']}: {counts['train']} train ({counts['replayed']} replayed), "
            f"{counts['eval']} eval -> {manifest['files']['train']}")
