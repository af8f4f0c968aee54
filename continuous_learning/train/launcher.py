"""Several processes: the launcher side (torchrun started with the resolved settings in the environment, progress
read back as JSON lines, the result or error read from a file rank 0 writes) and the process side (joining the
process group, DDP over the LoRA weights, summing a step's metrics over the processes)."""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from pathlib import Path

from ..core.errors import CLError, ConfigError, TrainingFailed
from ..core.settings import Settings
from ..storage.store import read_json

Progress = Callable[[dict], None]

LOCK_HELD_ENV = "CL_TRAIN_LOCK_HELD"  # set for launched processes: the launching process holds the workspace lock
RESULT_ENV = "CL_TRAIN_RESULT_FILE"  # where rank 0 writes the registry entry (or the error) for the launcher
PROGRESS_ENV = "CL_TRAIN_PROGRESS_JSON"  # rank 0 prints progress events as PROGRESS_PREFIX + JSON lines
PROGRESS_PREFIX = "@cl-progress "
SETTINGS_ENV = "CL_TRAIN_SETTINGS_JSON"  # the launcher's resolved settings, for launched processes


@dataclasses.dataclass(frozen=True)
class ProcessRole:
    """This process's place in a launch, from the variables torchrun / accelerate / `launch_processes` set: the one
    place they are read."""
    world: int = 1
    rank: int = 0
    lock_held_by_launcher: bool = False  # the launching process holds the workspace 'train' lock
    result_file: str | None = None  # where this launch's result goes (launched by `launch_processes`)
    progress_json: bool = False  # rank 0 prints progress events as JSON lines for the launcher

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def process_role(env: Mapping[str, str] | None = None) -> ProcessRole:
    env = os.environ if env is None else env
    return ProcessRole(world=int(env.get("WORLD_SIZE", "1")), rank=int(env.get("RANK", "0")),
                       lock_held_by_launcher=env.get(LOCK_HELD_ENV) == "1", result_file=env.get(RESULT_ENV),
                       progress_json=env.get(PROGRESS_ENV) == "1")


def join_process_group():
    """(world, rank, accelerator): the process group joined when a launcher (torchrun, accelerate launch) started
    several processes, else (1, 0, None)."""
    if process_role().world <= 1:
        return 1, 0, None
    import torch
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=not torch.cuda.is_available())  # gloo on CPU, NCCL on GPUs
    kind = accelerator.distributed_type.name
    if kind not in ("MULTI_CPU", "MULTI_GPU", "NO"):
        raise ConfigError(
            f"'cl train' runs data-parallel (DDP) only; this launch asked for {kind}",
            "launch with torchrun or 'cl train --num-processes N'; for FSDP + QLoRA see "
            "accelerate_fsdp_qlora.yaml's notes",
        )
    return accelerator.num_processes, accelerator.process_index, accelerator


def wrap_for_processes(model, world: int, accelerator):
    """DDP over the LoRA weights (the frozen 4-bit base is not synchronised: every rank loads the same one); the
    model itself with one process."""
    if world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device = model.device
    try:
        wrapped = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False,
        )
    except Exception as exc:  # noqa: BLE001 - turned into one clear line
        raise TrainingFailed(
            f"cannot wrap the model for {world} processes: {type(exc).__name__}: {exc}",
            "train with --no-4bit (full-precision LoRA), or with --num-processes 1",
        ) from exc
    accelerator.wait_for_everyone()  # rank 0 has created the run folder
    return wrapped


def sum_over_processes(values, world: int, device):
    if world == 1:
        return values
    import torch.distributed as dist

    out = values.to(device)
    dist.all_reduce(out)
    return out.cpu()


def leave_process_group(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def settings_env(settings: Settings) -> dict[str, str]:
    """The resolved settings as environment variables, so launched processes rebuild exactly these settings
    (flags given to the launching command included)."""
    import json

    sections = settings.as_dict()
    return {"CL_HOME": str(sections.pop("home")), SETTINGS_ENV: json.dumps(sections)}


def settings_from_env(env: dict[str, str], overrides: dict[str, dict], debug: bool = False) -> Settings:
    """Settings in a launched process: the launcher's (SETTINGS_ENV), else env / cl.toml; then `overrides`."""
    import json

    from ..core.settings import load_settings

    layers = json.loads(env[SETTINGS_ENV]) if env.get(SETTINGS_ENV) else {}
    for section, values in overrides.items():
        layers.setdefault(section, {}).update({k: v for k, v in values.items() if v is not None})
    return load_settings(env=env, overrides=layers, debug=debug)


def launch_command(settings: Settings, snapshot_id: str | None, fresh: bool, resume: bool,
                   note: str | None) -> list[str]:
    """torchrun (torch.distributed.run) starting `python -m continuous_learning.train` once per process."""
    import sys

    args = [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={settings.train.num_processes}", "-m", "continuous_learning.train"]
    if snapshot_id:
        args += ["--snapshot", snapshot_id]
    if fresh:
        args.append("--fresh")
    if resume:
        args.append("--resume")
    if note:
        args += ["--note", note]
    if settings.debug:
        args.append("--debug")
    return args


def launch_processes(settings: Settings, snapshot_id: str | None = None, fresh: bool = False, resume: bool = False,
                     note: str | None = None, progress: Progress | None = None) -> dict:
    """Run the training in `train.num_processes` data-parallel processes (the caller holds the 'train' lock).

    Rank 0 reports progress as JSON lines on its stdout and writes the registry entry (or its error) to a file;
    the processes' stderr is kept out of sight unless the run fails without a clear error (or with --debug)."""
    import json
    import subprocess
    import sys
    import tempfile

    n = settings.train.num_processes
    with tempfile.TemporaryDirectory(prefix="cl-train-") as tmp:
        result_file, log_file = Path(tmp) / "result.json", Path(tmp) / "stderr.log"
        env = {**os.environ, **settings_env(settings), LOCK_HELD_ENV: "1", RESULT_ENV: str(result_file),
               PROGRESS_ENV: "1"}
        if settings.model.threads <= 0:  # torchrun would pin every process to one thread
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // n))
        if progress is not None:
            progress({"event": "status", "message": f"starting {n} training processes (torchrun)"})
        with open(log_file, "w") as stderr:
            process = subprocess.Popen(
                launch_command(settings, snapshot_id, fresh, resume, note), env=env, stdout=subprocess.PIPE,
                stderr=None if settings.debug else stderr, text=True, cwd=str(settings.home),
            )
            for line in process.stdout:
                if line.startswith(PROGRESS_PREFIX):
                    if progress is not None:
                        progress(json.loads(line[len(PROGRESS_PREFIX):]))
                else:
                    sys.stderr.write(line)
            code = process.wait()
        return _launch_result(Path(tmp), result_file, log_file, n, code)


def _launch_result(tmp: Path, result_file: Path, log_file: Path, n: int, code: int) -> dict:
    """The registry entry rank 0 wrote, else the error a rank wrote raised as its own kind, else a failure."""
    result = read_json(result_file, default=None) or {}
    for other in sorted(tmp.glob(result_file.name + ".rank*")):
        if "error" in result or "entry" in result:
            break
        result = read_json(other, default=None) or {}
    if "entry" in result:  # rank 0 registered the adapter (even if another rank then failed to exit cleanly)
        return result["entry"]
    if "error" in result:
        from ..core import errors

        kind = getattr(errors, result.get("kind", ""), None)
        kind = kind if isinstance(kind, type) and issubclass(kind, CLError) else TrainingFailed
        raise kind(result["error"], result.get("hint"))
    tail = [line for line in log_file.read_text(errors="replace").splitlines() if line.strip()][-1:]
    raise TrainingFailed(f"the {n} training processes failed (exit code {code}){': ' + tail[0] if tail else ''}",
                         "run with --debug to see their output, or train with --num-processes 1")


def child_progress(as_json: bool) -> Progress:
    """How a launched process reports: JSON lines for the launcher, else short lines on stderr."""
    import json
    import sys

    def report(event: dict) -> None:
        if as_json:
            sys.stdout.write(PROGRESS_PREFIX + json.dumps(event, default=str) + "\n")
            sys.stdout.flush()
        elif event["event"] in ("status", "warning"):
            print(f"{event['event']}: {event['message']}", file=sys.stderr, flush=True)
        elif event["event"] == "step":
            print(f"step {event['step']}/{event['total_steps']} loss {event['loss']:.4f} "
                  f"{event['tokens_per_s']:.0f} tok/s", file=sys.stderr, flush=True)

    return report

