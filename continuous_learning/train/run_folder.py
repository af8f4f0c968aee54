"""The run folder's lifecycle: a run trains inside `adapters/.<version>.partial/` (run.json, metrics per step, a
resumable checkpoint), is marked with a FAILED file when it fails, is continued by `--resume` from its last
checkpoint with its own settings, and becomes `adapters/<version>/` once it succeeded."""
from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

from .. import registry
from ..chat.models import file_sha256
from ..core.errors import NothingToDo, TrainingFailed
from ..core.records import utc_now
from ..core.settings import Settings, TrainConfig
from ..storage.store import atomic_write_json, atomic_write_jsonl, ensure_dir, iter_jsonl, read_json
from .metrics import write_loss_curve

PARTIAL_SUFFIX = ".partial"
RUN_FILE = "run.json"
FAILED_FILE = "FAILED"
CHECKPOINT_DIR = "checkpoint"
TRAINER_STATE = "trainer_state.pt"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")  # the files whose sha256 the registry keeps
START_OVER = "start a new run with 'cl train' (without --resume)"
RESUME_HINT = "'cl train --resume' continues it from its last checkpoint; 'cl train' starts over"
RUN_ONLY_FILES = (CHECKPOINT_DIR, f"{CHECKPOINT_DIR}.old", f"{CHECKPOINT_DIR}.tmp", RUN_FILE, FAILED_FILE,
                  "metrics.jsonl.lock")  # what a finished adapter folder does not keep


def free_version(settings: Settings, doc: dict, base_sha256: str) -> str:
    """The next version (see registry.next_version) whose folder does not exist either."""
    version = registry.next_version(doc, base_sha256)
    major, minor, _ = (int(p) for p in version.split("."))
    while (settings.adapters_dir / version).exists():
        minor += 1
        version = f"{major}.{minor}.0"
    return version


def partial_dir(settings: Settings, version: str) -> Path:
    return settings.adapters_dir / f".{version}{PARTIAL_SUFFIX}"


def partial_runs(settings: Settings) -> list[Path]:
    folder = settings.adapters_dir
    if not folder.exists():
        return []
    runs = [p for p in folder.glob(f".*{PARTIAL_SUFFIX}") if p.is_dir() and (p / RUN_FILE).exists()]
    return sorted(runs, key=lambda p: p.stat().st_mtime)


def newest_partial_run(settings: Settings) -> Path:
    runs = partial_runs(settings)
    if not runs:
        raise NothingToDo("there is no interrupted training run to resume", "start one with 'cl train'")
    return runs[-1]


@dataclasses.dataclass(frozen=True)
class ResumedRun:
    """What a resumed run keeps from its run.json: its snapshot, hyperparameters, version and parent."""

    state: dict
    cfg: TrainConfig
    snapshot_id: str
    version: str
    parent: str | None
    warm_start: dict
    note: str | None
    created_at: str
    metrics: dict
    warnings: list[str]

    def refuse_changed_snapshot(self, snapshot_id: str, sha256: str, run_name: str) -> None:
        if self.state["snapshot"].get("sha256") not in (None, sha256):
            raise TrainingFailed(f"snapshot {snapshot_id} changed since the interrupted run in {run_name} was started",
                                 START_OVER)

    def refuse_changed_base(self, sha256: str, run_name: str) -> None:
        if self.state["base_model"]["sha256"] != sha256:
            raise TrainingFailed(f"the base model changed since the interrupted run in {run_name} was started",
                                 START_OVER)


def adopt_run_state(state: dict, cfg: TrainConfig, snapshot_id: str | None, fresh: bool, note: str | None,
                    created_at: str) -> ResumedRun:
    """A resumed run keeps its own snapshot, hyperparameters, version and parent; flags that differ are ignored."""
    saved = TrainConfig(**state["train"])
    warnings = []
    ignored = [f.name for f in dataclasses.fields(TrainConfig) if getattr(saved, f.name) != getattr(cfg, f.name)]
    if ignored:
        warnings.append(f"--resume keeps the interrupted run's settings; ignored: {', '.join(ignored)}")
    if snapshot_id and snapshot_id != state["snapshot"]["id"]:
        warnings.append(f"--resume continues on snapshot {state['snapshot']['id']}; --snapshot ignored")
    metrics = {}
    if state.get("eval_loss_start") is not None:
        metrics["eval_loss_start"] = state["eval_loss_start"]
    start = state.get("preference_start") or {}
    if start.get("rejected_loglik_start") is not None:
        metrics.update(start)
    if fresh:
        warnings.append("--fresh is ignored with --resume")
    parent = state.get("parent")
    return ResumedRun(state, saved, state["snapshot"]["id"], state["version"], parent,
                      state.get("warm_start") or {"from": parent}, note or state.get("note"),
                      state.get("created_at", created_at), metrics, warnings)


def read_run_state(run_dir: Path) -> dict:
    return read_json(run_dir / RUN_FILE)


def run_state(version: str, snapshot: dict, snapshot_sha256: str, base, parent: str | None, warm_start: dict,
              cfg: TrainConfig, note: str | None, created_at: str, metrics: dict) -> dict:
    """run.json: what a resumed run needs to continue exactly this run."""
    return {
        "version": version,
        "snapshot": {"id": snapshot["id"], "sha256": snapshot_sha256},
        "base_model": {"name": base.name, "sha256": base.sha256},
        "parent": parent,
        "warm_start": warm_start,
        "train": dataclasses.asdict(cfg),
        "note": note,
        "created_at": created_at,
        "eval_loss_start": metrics.get("eval_loss_start"),
        "preference_start": {k: metrics.get(k) for k in ("rejected_loglik_start", "chosen_loglik_start")},
    }


def start_run_dir(settings: Settings, version: str, state: dict) -> tuple[Path, list[str]]:
    """A new, empty partial folder with its run.json; earlier unfinished runs are discarded (the warnings say so)."""
    adapters = ensure_dir(settings.adapters_dir)
    warnings = []
    for stale in partial_runs(settings):
        warnings.append(f"discarding the earlier unfinished run {stale.name} "
                        "('cl train --resume' would have continued it)")
        shutil.rmtree(stale, ignore_errors=True)
    run_dir = partial_dir(settings, version)
    shutil.rmtree(run_dir, ignore_errors=True)
    ensure_dir(run_dir)
    assert run_dir.parent == adapters
    atomic_write_json(run_dir / RUN_FILE, state)
    return run_dir, warnings


def checkpoint_dir(run_dir: Path | None) -> Path | None:
    if run_dir is None:
        return None
    for name in (CHECKPOINT_DIR, CHECKPOINT_DIR + ".old"):  # .old survives a crash in the middle of a swap
        folder = run_dir / name
        if (folder / TRAINER_STATE).exists() and (folder / "adapter_config.json").exists():
            return folder
    return None


def save_checkpoint(run_dir: Path, model, optimizer, scheduler, step: int) -> None:
    """The adapter and the optimizer, schedule and RNG state after `step`, swapped in so a crash keeps one whole."""
    import torch

    tmp = run_dir / f"{CHECKPOINT_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    state = {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    torch.save(state, tmp / TRAINER_STATE)
    current, old = run_dir / CHECKPOINT_DIR, run_dir / f"{CHECKPOINT_DIR}.old"
    shutil.rmtree(old, ignore_errors=True)
    if current.exists():
        os.replace(current, old)
    os.replace(tmp, current)
    shutil.rmtree(old, ignore_errors=True)


def restore_checkpoint(run_dir: Path, optimizer, scheduler, is_main: bool) -> tuple[int, list[dict]] | None:
    """Optimizer, schedule and RNG state from the last checkpoint; returns (step, the metrics rows up to it), or
    None when the run was interrupted before its first checkpoint (it then starts again from step 0)."""
    import torch

    folder = checkpoint_dir(run_dir)
    rows = [r for _, r in iter_jsonl(run_dir / "metrics.jsonl")]
    if is_main:
        (run_dir / FAILED_FILE).unlink(missing_ok=True)
    if folder is None:
        if is_main:
            atomic_write_jsonl(run_dir / "metrics.jsonl", [])
        return None
    state = torch.load(folder / TRAINER_STATE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    if state.get("cuda_rng") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    step = int(state["step"])
    history = [r for r in rows if r.get("step", 0) <= step]
    if is_main:
        atomic_write_jsonl(run_dir / "metrics.jsonl", history)  # steps after the checkpoint are redone
    return step, history


def mark_failed(run_dir: Path, reason: str, step: int, steps: int) -> None:
    atomic_write_json(run_dir / FAILED_FILE, {"reason": reason, "step": step, "steps": steps, "at": utc_now()})


def write_adapter(run_dir: Path, model, training_config: dict, history: list[dict], lineage: dict) -> None:
    """The standard PEFT files and the run's records: training config, loss curve, lineage."""
    model.save_pretrained(str(run_dir))
    atomic_write_json(run_dir / "training_config.json", training_config)
    write_loss_curve(run_dir, history)
    atomic_write_json(run_dir / "lineage.json", lineage)


def clear_run_files(run_dir: Path) -> None:
    for name in RUN_ONLY_FILES:
        target = run_dir / name
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)


def publish(run_dir: Path, final: Path) -> None:
    """The finished run becomes `final`; its files are private like every other user data file."""
    for item in run_dir.iterdir():
        if item.is_file():
            item.chmod(0o600)
    os.replace(run_dir, final)


def register_candidate(settings: Settings, run_dir: Path, lineage: dict, metrics: dict,
                       timings: dict) -> tuple[Path, dict]:
    """Publish the finished run as `adapters/<version>/` and register it as a candidate: (its folder, its entry)."""
    version = lineage["version"]
    digests = {name: file_sha256(run_dir / name) for name in ADAPTER_FILES}
    entry = {**lineage, "path": f"adapters/{version}", "status": "candidate", "sha256": digests,
             "metrics": metrics, "timings": {k: round(v, 3) for k, v in timings.items()}}
    final = settings.adapters_dir / version
    publish(run_dir, final)
    doc = registry.update(settings, lambda d: registry.register_adapter(d, entry), "adapter_trained",
                          version=version, snapshot=lineage["snapshot"]["id"], parent=lineage["parent"],
                          final_loss=metrics.get("final_loss"))
    return final, registry.adapter(doc, version)
