"""The QLoRA recipe: fine-tune a PEFT LoRA adapter on a curated snapshot and register it as a candidate.

Shaped like a torchtune recipe: `Trainer(settings, ...)` with `setup()` (config validated before any heavy work),
`train()`, `save()`, `register()` and `cleanup()`; `run_training()` runs them under the workspace 'train' lock.

A run trains inside `adapters/.<version>.partial/` (metrics per step, a resumable checkpoint every
`checkpoint_every` steps) and is renamed to `adapters/<version>/` and registered only when it succeeded. A NaN loss,
an exception or Ctrl-C leaves the registry untouched and the partial folder marked with a FAILED file;
`resume=True` continues the newest partial run from its last checkpoint.

The loss is SFT on the final assistant answers, the KL rehearsal term toward the frozen base on everyday prompts,
and, when the snapshot has answers rated unhelpful or corrections, the preference terms of `preference.py` (KTO
for unpaired answers, DPO for pairs; `train.objective`), against the base measured once with the adapter disabled.

The parts it composes return values that the recipe stores: the run folder (`run_folder`), the warm-start choice
(`warm_start`), the data (`data`), the model (`model_build`), the base's references (`references`), the step plan,
collation and the optimizer step (`plan`, `collate`, `step`), the losses (`losses`), the metrics (`metrics`) and the
processes (`launcher`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path
from typing import Any

from .. import registry
from ..chat.models import BaseModel, load_tokenizer, quiet_known_warnings, resolve_base, set_threads
from ..core.errors import CLError, TrainingFailed
from ..core.records import utc_now
from ..core.settings import Settings, TrainConfig
from ..storage.store import append_jsonl, atomic_write_json, workspace_lock
from . import launcher, losses, metrics, preference, references, run_folder
from .collate import micro_batches
from .config import total_steps
from .data import RunData, prepare_data, resolve_snapshot, snapshot_file
from .encode import pad_token_id
from .model_build import build_model, build_optimizer, release_memory, require_bitsandbytes, unpack_bnb_cpu_weights
from .plan import shard, step_anchors, step_examples, step_undesirable
from .step import optimizer_step, step_scale
from .warm_start import choose_warm_start, verified_adapter_dir


class Trainer:
    """One training run. `setup()` -> `train()` -> `save()` -> `register()`; `cleanup()` always."""

    def __init__(self, settings: Settings, snapshot_id: str | None = None, fresh: bool = False,
                 resume: bool = False, note: str | None = None, progress: launcher.Progress | None = None):
        self.settings = settings
        self.cfg: TrainConfig = settings.train
        self.snapshot_id, self.fresh, self.resume, self.note = snapshot_id, fresh, resume, note
        self._progress = progress
        # filled by setup()
        self.base: BaseModel | None = None
        self.snapshot: dict | None = None
        self.snapshot_sha256 = self.version = self.parent = None
        self.run_dir: Path | None = None
        self.final_dir: Path | None = None
        self.warm_start: dict = {"from": None}
        self.resumed_from_checkpoint = False
        self.model = self.tokenizer = self.optimizer = self.scheduler = None
        self.forward: losses.Forward | None = None
        self.data = RunData([], [], preference.resolve_objective("sft", 0, 0))
        self.steps = self.start_step = self.step = 0
        self.history: list[dict] = []  # metrics rows of this run (restored ones included on resume)
        self.metrics, self.timings, self.warnings = {}, {}, []
        self.created_at = utc_now()
        # data-parallel: set by setup() when launched by torchrun / accelerate (WORLD_SIZE > 1)
        self.world, self.rank, self.accelerator = 1, 0, None
        self._train_model = None  # the model the loop calls: DDP-wrapped when world > 1

    # what the tests and benchmarks read of the data
    examples = property(lambda self: self.data.examples)
    undesirable = property(lambda self: self.data.undesirable)
    objective = property(lambda self: self.data.objective)
    records = property(lambda self: self.data.records)
    undesirable_records = property(lambda self: self.data.undesirable_records)

    @property
    def is_main(self) -> bool:
        """Only this process writes the run folder, metrics, adapter and registry, and reports progress."""
        return self.rank == 0

    @property
    def device(self):
        return self.model.device

    def _emit(self, event: str, **data: Any) -> None:
        if self._progress is not None and self.is_main:
            self._progress({"event": event, **data})

    def _warn(self, message: str) -> None:
        self.warnings.append(message)
        self._emit("warning", message=message)

    # -- setup -----------------------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Resolve snapshot and base, load and wrap the model, build optimizer and schedule."""
        started = time.perf_counter()
        quiet_known_warnings()  # before anything imports bitsandbytes
        self.world, self.rank, self.accelerator = launcher.join_process_group()
        require_bitsandbytes(self.cfg)
        doc = registry.load(self.settings)
        resumed = self._adopt_interrupted_run() if self.resume else None
        train_path = self._resolve_inputs(doc, resumed)
        self._emit("status", message=f"tokenizing snapshot {self.snapshot['id']}")
        self.tokenizer = load_tokenizer(self.base)
        self.data = prepare_data(self.settings, self.base, self.tokenizer, self.snapshot, train_path,
                                 lambda message: self._emit("status", message=message), self._warn)
        # the "no" answers ride beside the SFT examples (as many per step), so they never take steps from them
        self.steps = total_steps(self.cfg, max(self.data.records, self.data.undesirable_records), self.world)
        source = self._adapter_source(doc, resumed)
        self.timings["prepare_s"] = time.perf_counter() - started
        self._build_model(source, self._kl_parent(doc, source))
        self._open_run_dir(resumed)
        self._train_model = launcher.wrap_for_processes(self.model, self.world, self.accelerator)
        self.timings["setup_s"] = time.perf_counter() - started

    def _adopt_interrupted_run(self) -> run_folder.ResumedRun:
        """The newest partial run, whose own snapshot, settings, version and parent this run keeps."""
        self.run_dir = run_folder.newest_partial_run(self.settings)
        resumed = run_folder.adopt_run_state(run_folder.read_run_state(self.run_dir), self.cfg, self.snapshot_id,
                                             self.fresh, self.note, self.created_at)
        for message in resumed.warnings:
            self._warn(message)
        self.settings, self.cfg = dataclasses.replace(self.settings, train=resumed.cfg), resumed.cfg
        self.snapshot_id, self.version, self.parent = resumed.snapshot_id, resumed.version, resumed.parent
        self.warm_start, self.note, self.created_at = resumed.warm_start, resumed.note, resumed.created_at
        self.metrics.update(resumed.metrics)
        return resumed

    def _resolve_inputs(self, doc: dict, resumed: run_folder.ResumedRun | None) -> Path:
        """Snapshot and base model (a resumed run refuses either one changed); returns the snapshot's file."""
        self.snapshot = resolve_snapshot(doc, self.snapshot_id)
        self.snapshot_id = self.snapshot_id or self.snapshot["id"]
        train_path, self.snapshot_sha256 = snapshot_file(self.settings, self.snapshot)
        if resumed is not None:
            resumed.refuse_changed_snapshot(self.snapshot["id"], self.snapshot_sha256, self.run_dir.name)
        set_threads(self.settings)
        self.base = resolve_base(self.settings)
        if resumed is not None:
            resumed.refuse_changed_base(self.base.sha256, self.run_dir.name)
        return train_path

    def _adapter_source(self, doc: dict, resumed: run_folder.ResumedRun | None) -> Path | None:
        """The adapter the model starts from: the checkpoint of a resumed run, else its (or a new run's) parent."""
        if resumed is None:
            warm = choose_warm_start(self.settings, doc, self.base.sha256, self.fresh)
            if warm.warning:
                self._warn(warm.warning)
            self.parent, self.warm_start = warm.parent, warm.record
            self.version = run_folder.free_version(self.settings, doc, self.base.sha256)
            return warm.folder
        checkpoint = run_folder.checkpoint_dir(self.run_dir)  # the parent only matters without one
        self.resumed_from_checkpoint = checkpoint is not None
        return checkpoint or (verified_adapter_dir(self.settings, doc, resumed.parent) if resumed.parent else None)

    def _build_model(self, source: Path | None, kl_parent: references.KLParent | None) -> None:
        precision = "4-bit NF4" if self.cfg.load_in_4bit else "full precision"
        self._emit("status", message=f"loading {self.base.name} ({precision})")
        built = build_model(self.base, self.cfg, source, self.settings.model_cache)
        self.model, self.forward = built.model, losses.Forward(built.model.device, built.autocast,
                                                               built.logits_to_keep)
        self.timings.update(built.timings)
        measured = references.measure_base(self.forward, self.model, self.data, self.settings.model_cache,
                                          self.base.sha256, self.cfg.load_in_4bit, self.pad_id, self.is_main,
                                          lambda message: self._emit("status", message=message), kl_parent)
        self.timings.update({name: round(seconds, 3) for name, seconds in measured.items()})
        self.optimizer, self.scheduler = build_optimizer(self.model, self.cfg, self.steps)

    def _kl_parent(self, doc: dict, source: Path | None) -> references.KLParent | None:
        """The adapter the KL term holds this run to, when not the base: the parent it warm-starts from, known by
        its registered (and, when loaded, verified) weights digest."""
        entry = registry.adapter_view(doc, self.parent)
        if entry is None or self.cfg.kl_reference != "parent" or source is None:
            return None
        weights = entry.sha256.get("adapter_model.safetensors", "")
        return references.KLParent(self.parent, weights, loaded=not self.resumed_from_checkpoint)

    def _open_run_dir(self, resumed: run_folder.ResumedRun | None) -> None:
        """A new partial folder, or the resumed one restored to its last checkpoint."""
        if resumed is None:
            if not self.is_main:
                self.run_dir = run_folder.partial_dir(self.settings, self.version)
                return
            self.run_dir, warnings = run_folder.start_run_dir(self.settings, self.version, self._run_state())
            for message in warnings:
                self._warn(message)
            return
        restored = run_folder.restore_checkpoint(self.run_dir, self.optimizer, self.scheduler, self.is_main)
        if restored is None:  # interrupted before the first checkpoint: start the same run again from step 0
            self._warn(f"{self.run_dir.name} has no checkpoint yet: restarting it from step 0")
            return
        self.start_step, self.history = restored
        self.step = self.start_step
        self._emit("status", message=f"resuming {self.run_dir.name} at step {self.start_step}/{self.steps}")

    def _run_state(self) -> dict:
        return run_folder.run_state(self.version, self.snapshot, self.snapshot_sha256, self.base, self.parent,
                                    self.warm_start, self.cfg, self.note, self.created_at, self.metrics)

    def save_checkpoint(self) -> None:
        run_folder.save_checkpoint(self.run_dir, self.model, self.optimizer, self.scheduler, self.step)

    def mark_failed(self, reason: str) -> None:
        if self.is_main and self.run_dir is not None and self.run_dir.exists():
            run_folder.mark_failed(self.run_dir, reason, self.step, self.steps)

    @property
    def pad_id(self) -> int:
        return pad_token_id(self.tokenizer)

    # -- training --------------------------------------------------------------------------------------------------
    def train(self) -> dict:
        """The loop: AdamW on the LoRA weights, warm-up + linear decay, gradient accumulation, weighted loss on the
        final assistant tokens. Raises TrainingFailed on a non-finite loss or gradient.

        The objective of a step is sum(weight x token loss) / labelled tokens of the whole (global) step, whether
        the step is packed, padded or spread over processes: all of them give the same gradient."""
        self.model.train()
        unpack_bnb_cpu_weights(self.model)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self._measure_start()
        self._emit("start", step=self.step, total_steps=self.steps, examples=len(self.data.examples))
        session_started = time.perf_counter()
        session_seconds = 0.0
        while self.step < self.steps:
            row = self._train_step(params)
            session_seconds += row["seconds"]
            self.history.append(row)
            if self.is_main:
                append_jsonl(self.run_dir / "metrics.jsonl", [row])
                every = self.cfg.checkpoint_every
                if every and self.step % every == 0 and self.step < self.steps:
                    self.save_checkpoint()
            eta = metrics.eta_seconds(session_seconds, self.step - self.start_step, self.steps - self.step)
            self._emit("step", total_steps=self.steps, eta_s=eta, **row)
        self.timings["train_loop_s"] = time.perf_counter() - session_started
        self._measure_end()
        return self.metrics

    def _train_step(self, params: list) -> dict:
        """One optimizer step over this process's share of the step; returns its metrics row."""
        started = time.perf_counter()
        cfg, data, step, world, rank = self.cfg, self.data, self.step, self.world, self.rank
        everyone = step_examples(data.examples, cfg, step, world, data.lengths)
        rehearsal = step_anchors(data.anchors, cfg, step, world, rank, data.pushes_down)
        mine, undesirable = shard(everyone, rank, world), step_undesirable(data.undesirable, cfg, step, world, rank)
        scale = step_scale(everyone, mine, rehearsal, undesirable, world, cfg.rehearsal_weight,
                           cfg.preference_weight)
        batches = micro_batches(cfg, mine, rehearsal, undesirable, self.pad_id, self.device)
        done = optimizer_step(self.forward, self._train_model, batches, scale, params, self.optimizer, self.scheduler,
                              world, step)
        self.step += 1
        elapsed_before = self.history[-1]["elapsed_s"] if self.history else 0.0
        kl_world = self.world if self.data.anchors else None
        preference_world = self.world if self.data.objective["name"] != "sft" else None
        return metrics.step_row(self.step, done.sums, scale.label_tokens, done.lr, done.grad_norm,
                                time.perf_counter() - started, elapsed_before, kl_world, preference_world)

    def _measure_start(self) -> None:
        """Held-out loss and answer likelihoods before the first step (kept in run.json for a resumed run)."""
        if self.start_step == 0 and self.data.preference_eval and "rejected_loglik_start" not in self.metrics:
            start = losses.preference_logliks(self.forward, self.model, self.data.preference_eval, self.pad_id)
            self.metrics.update(rejected_loglik_start=start["rejected_loglik"],
                                chosen_loglik_start=start["chosen_loglik"])
        if self.start_step == 0 and self.data.eval_examples and "eval_loss_start" not in self.metrics:
            self.metrics["eval_loss_start"] = self._held_out_loss(self.data.eval_examples)["loss"]
            if self.is_main:
                atomic_write_json(self.run_dir / run_folder.RUN_FILE, self._run_state())

    def _measure_end(self) -> None:
        """The run's summary, held-out loss and answer likelihoods after the last step."""
        held_out = self.data.eval_examples
        self.metrics.update(metrics.run_summary(self.history, self.data, self.cfg, self.step, self.start_step,
                                                self.device, self.world))
        if held_out:
            self._emit("status", message=f"held-out loss on {len(held_out)} eval example(s)")
            started = time.perf_counter()
            result = self._held_out_loss(held_out)
            self.metrics.update(eval_loss=result["loss"], eval_perplexity=result["perplexity"],
                                eval_tokens=result["tokens"])
            self.timings["held_out_s"] = time.perf_counter() - started
        self.metrics.update(losses.preference_logliks(self.forward, self.model, self.data.preference_eval,
                                                      self.pad_id))

    def _held_out_loss(self, examples: list[dict]) -> dict:
        return losses.held_out_loss(self.forward, self.model, examples, self.cfg.batch_size, self.pad_id)

    # -- output ----------------------------------------------------------------------------------------------------
    def save(self) -> Path:
        """Write the standard PEFT files and the run's records into the run folder; returns it."""
        self._emit("status", message="saving the adapter")
        started = time.perf_counter()
        config = metrics.training_config(self.cfg, self.steps, self.settings.model, self.base, self.snapshot,
                                         self.snapshot_sha256, self.warm_start, self.device, self.forward.autocast,
                                         self.world)
        run_folder.write_adapter(self.run_dir, self.model, config, self.history, self._lineage())
        self.timings["save_s"] = time.perf_counter() - started
        return self.run_dir

    def _lineage(self) -> dict:
        return metrics.lineage(self.version, self.base, self.snapshot, self.snapshot_sha256, self.parent,
                               self.warm_start, self.cfg, self.note, self.created_at)

    def register(self) -> dict:
        """Move the finished run into `adapters/<version>/` and register it as a candidate. Returns the entry."""
        run_folder.clear_run_files(self.run_dir)
        doc = registry.load(self.settings)
        if registry.adapter_view(doc, self.version) is not None or (self.settings.adapters_dir / self.version).exists():
            # taken meanwhile, or a folder the registry does not know (an older registry restored): never
            # overwrite it, take the next free version
            self.version = run_folder.free_version(self.settings, doc, self.base.sha256)
            atomic_write_json(self.run_dir / "lineage.json", self._lineage())
        self.final_dir, entry = run_folder.register_candidate(self.settings, self.run_dir, self._lineage(),
                                                              self.metrics, self.timings)
        self.run_dir = self.final_dir
        return entry

    def cleanup(self) -> None:
        self.model = self.optimizer = self.scheduler = self._train_model = None
        launcher.leave_process_group(self.world)
        release_memory()


# --- the one entry point ----------------------------------------------------------------------------------------
def run_training(settings: Settings, snapshot_id: str | None = None, fresh: bool = False, resume: bool = False,
                 note: str | None = None, progress: launcher.Progress | None = None) -> dict:
    """Train, save and register a candidate adapter under the workspace 'train' lock. Returns its registry entry.

    Raises LockHeldError when another training holds the lock, NothingToDo without a snapshot (or, with
    resume, without an interrupted run), and TrainingFailed for everything that goes wrong once a run folder exists
    (NaN, exceptions, Ctrl-C): then nothing is registered and the run folder keeps a FAILED file with the reason.
    Bad hyperparameters never get this far: `TrainConfig` refuses them (ConfigError) when the settings are built.
    """
    role = launcher.process_role()
    if role.world <= 1 and settings.train.num_processes > 1:
        with workspace_lock(settings.lock_dir, "train"):
            return launcher.launch_processes(settings, snapshot_id=snapshot_id, fresh=fresh, resume=resume, note=note,
                                    progress=progress)
    # under a launcher the lock is held by whoever launched us (LOCK_HELD_ENV), else by rank 0 alone
    take_lock = role.is_main and not role.lock_held_by_launcher
    with workspace_lock(settings.lock_dir, "train") if take_lock else contextlib.nullcontext():
        trainer = Trainer(settings, snapshot_id=snapshot_id, fresh=fresh, resume=resume, note=note, progress=progress)
        try:
            trainer.setup()
            trainer.train()
            if not trainer.is_main:
                return {}
            trainer.save()
            return trainer.register()
        except BaseException as exc:  # noqa: BLE001 - every failure is recorded, then re-raised
            raise _failure(settings, trainer, exc) from exc
        finally:
            trainer.cleanup()


def _failure_reason(settings: Settings, trainer: Trainer, exc: BaseException) -> str:
    if isinstance(exc, KeyboardInterrupt):
        return f"interrupted at step {trainer.step}/{trainer.steps}"
    if isinstance(exc, losses.NonFiniteLoss):
        return f"{exc} (try a lower learning rate, e.g. --lr {settings.train.learning_rate / 4:g})"
    if isinstance(exc, CLError):
        return exc.message
    return f"{type(exc).__name__}: {exc}"


def _failure(settings: Settings, trainer: Trainer, exc: BaseException) -> BaseException:
    started = trainer.run_dir is not None and trainer.run_dir.exists() and trainer.final_dir is None
    if isinstance(exc, CLError) and not started:
        return exc  # setup refused (bad config, no snapshot, no model): the error already says what to do
    reason = _failure_reason(settings, trainer, exc)
    if started:
        trainer.mark_failed(reason)
    try:
        if trainer.is_main:  # one event per run, however many processes
            registry.log_event(
                settings,
                "train_failed",
                version=trainer.version,
                snapshot=trainer.snapshot_id,
                step=trainer.step,
                reason=reason,
                run_dir=str(trainer.run_dir.relative_to(settings.home)) if started else None,
            )
    except CLError:  # pragma: no cover - the original failure matters more than its log line
        pass
    where = f"; the partial run is kept in {trainer.run_dir.relative_to(settings.home)}" if started else ""
    hint = run_folder.RESUME_HINT if started else "run with --debug for the traceback"
    if isinstance(exc, TrainingFailed):
        return TrainingFailed(exc.message + where, exc.hint or hint)
    return TrainingFailed(f"training failed: {reason}{where}", hint)
