"""`python -m continuous_learning.train`: the options of 'cl train' as argparse flags, for one process or for each
process torchrun / accelerate launch starts (rank 0 reports the result to the launcher)."""
from __future__ import annotations

import os
from pathlib import Path

from ..core.errors import CLError
from ..storage.store import atomic_write_json
from .config import step_overrides
from .launcher import child_progress, process_role, settings_from_env
from .recipe import run_training


def _parse_args(argv: list[str] | None):
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m continuous_learning.train",
        description="Train a LoRA adapter (the options of 'cl train'); under torchrun / accelerate launch the "
                    "processes train data-parallel and rank 0 saves and registers the adapter.",
    )
    parser.add_argument("--home", help="workspace (default: CL_HOME or the current folder)")
    parser.add_argument("--base-model", help="base model (default: the configured one)")
    parser.add_argument("--snapshot", help="snapshot id to train on (default: the newest)")
    parser.add_argument("--fresh", action="store_true", help="start from the base model instead of the champion")
    parser.add_argument("--resume", action="store_true", help="continue the newest interrupted run")
    parser.add_argument("--4bit", dest="load_in_4bit", action=argparse.BooleanOptionalAction, default=None,
                        help="QLoRA (4-bit NF4 base) or full precision")
    parser.add_argument("--steps", type=int, default=None, help="exactly N optimizer steps")
    parser.add_argument("--epochs", type=int, default=None, help="exactly N passes over the snapshot")
    for flag, field, typ in (("--lr", "learning_rate", float), ("--rank", "lora_r", int),
                             ("--alpha", "lora_alpha", int), ("--dropout", "lora_dropout", float),
                             ("--batch-size", "batch_size", int), ("--grad-accum", "grad_accum", int),
                             ("--max-seq-len", "max_seq_len", int), ("--seed", "seed", int),
                             ("--num-processes", "num_processes", int), ("--objective", "objective", str)):
        parser.add_argument(flag, dest=field, type=typ, default=None)
    parser.add_argument("--note", help="a note stored with the adapter version")
    parser.add_argument("--json", dest="as_json", action="store_true", help="print the registry entry as JSON")
    parser.add_argument("--debug", action="store_true", help="tracebacks instead of one-line errors")
    return parser.parse_args(argv)


TRAIN_FLAGS = ("load_in_4bit", "learning_rate", "lora_r", "lora_alpha", "lora_dropout",
               "batch_size", "grad_accum", "max_seq_len", "seed", "num_processes", "objective")


def main(argv: list[str] | None = None) -> int:
    """`python -m continuous_learning.train`, `torchrun -m continuous_learning.train`, `accelerate launch -m ...`."""
    import json
    import sys

    args = _parse_args(argv)
    role = process_role()
    rank, result_file = role.rank, role.result_file
    try:
        overrides = {"train": {**{k: getattr(args, k) for k in TRAIN_FLAGS}, **step_overrides(args.steps, args.epochs)}}
        if args.base_model:
            overrides["model"] = {"base_model": args.base_model}
        env = dict(os.environ)
        if args.home:
            env["CL_HOME"] = args.home
        settings = settings_from_env(env, overrides, debug=args.debug)
        entry = run_training(settings, snapshot_id=args.snapshot, fresh=args.fresh, resume=args.resume, note=args.note,
                             progress=child_progress(role.progress_json))
    except CLError as exc:
        if result_file:  # rank 0's error is the one shown; another rank's only when rank 0 had none
            target = Path(result_file if rank == 0 else f"{result_file}.rank{rank}")
            atomic_write_json(target, {"error": exc.message, "hint": exc.hint, "kind": type(exc).__name__})
        if args.debug:
            raise
        print(f"error: {exc.message}" + (f" ({exc.hint})" if exc.hint else ""), file=sys.stderr)
        return 1
    if rank != 0:
        return 0
    if result_file:
        atomic_write_json(Path(result_file), {"entry": entry})
    elif args.as_json:
        print(json.dumps(entry, indent=2, default=str))
    else:
        metrics = entry.get("metrics", {})
        print(f"adapter {entry['version']} (candidate): {metrics.get('steps')} steps on {metrics.get('processes', 1)} "
              f"process(es), loss {metrics.get('final_loss', 0):.4f}, {metrics.get('tokens_per_s', 0):.0f} tok/s")
    return 0

