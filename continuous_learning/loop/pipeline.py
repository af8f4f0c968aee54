"""`python -m continuous_learning.pipeline`: the learning loop's stages, run in order.

One function per stage (`curate_stage`, ...), each taking the settings and the parsed arguments and returning
a JSON-able result; `main` runs the stages that were asked for and prints their results.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

import orjson

from ..core.errors import CLError
from ..core.settings import Settings, load_settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m continuous_learning.pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--home", help="Workspace root (default: CL_HOME or the current folder).")
    parser.add_argument("--curate", action="store_true", help="Curate new logged turns into a training snapshot.")
    parser.add_argument("--full", action="store_true", help="Curate: rebuild from all logs, ignoring the cursor.")
    parser.add_argument("--include-unrated", action="store_true", help="Curate: also train on turns nobody rated.")
    parser.add_argument("--train", action="store_true", help="Train an adapter on the new (or newest) snapshot.")
    parser.add_argument("--eval", dest="evaluate", action="store_true", help="Evaluate the new adapter and promote it "
                                                                             "if better.")
    parser.add_argument("--no-promote", action="store_true", help="Eval: show the gate decision but never promote.")
    parser.add_argument("--note", help="A note stored with what this run creates.")
    parser.add_argument("--json", dest="as_json", action="store_true", help="Print the results as JSON.")
    return parser


def curate_stage(settings: Settings, args: argparse.Namespace) -> dict:
    """The snapshot manifest (`status` "created" or "nothing_new")."""
    from ..curate import run_curate

    return run_curate(settings, full=args.full, include_unrated=True if args.include_unrated else None, note=args.note)


def train_stage(settings: Settings, args: argparse.Namespace, snapshot_id: str | None) -> dict:
    """The new adapter's registry entry (a candidate)."""
    from ..train import run_training

    return run_training(settings, snapshot_id=snapshot_id, note=args.note)


def eval_stage(settings: Settings, args: argparse.Namespace, version: str | None) -> dict:
    """Side-by-side results, the gate decision and whether the candidate was promoted."""
    from ..evaluate import evaluate_and_gate

    return evaluate_and_gate(settings, candidate=version, promote=not args.no_promote)


def _describe_curate(manifest: dict) -> str:
    if manifest["status"] != "created":
        return manifest["message"]
    counts = manifest["counts"]
    return (f"snapshot {manifest['id']}: {counts['train']} train ({counts['replayed']} replayed), "
            f"{counts['eval']} eval -> {manifest['files']['train']}")


def _emit(results: dict[str, Any], as_json: bool) -> None:
    if as_json:
        sys.stdout.write(orjson.dumps(results, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    if "curate" in results:
        print(_describe_curate(results["curate"]))
    if "train" in results:
        entry = results["train"]
        print(f"adapter {entry['version']} trained: loss {entry['metrics'].get('initial_loss', 0):.3f} -> "
              f"{entry['metrics'].get('final_loss', 0):.3f}")
    if "eval" in results:
        report = results["eval"]
        subject, against = report["subject"], report["against"]
        print(f"accuracy {subject['passed']}/{subject['total']}"
              + (f" vs {against['label']} {against['passed']}/{against['total']}" if against else ""))
        if report["decision"]:
            print(report["decision"].get("summary") or "; ".join(report["decision"]["reasons"]))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not (args.curate or args.train or args.evaluate):
        parser.error("choose at least one stage: --curate, --train, --eval")
    results: dict[str, Any] = {}
    try:
        settings = load_settings(home=args.home)
        snapshot_id = version = None
        if args.evaluate:
            from ..evaluate import check_eval_ready

            plan = check_eval_ready(settings)  # before the expensive stages
            if not args.as_json:
                print(plan, file=sys.stderr)
        if args.curate:
            results["curate"] = curate_stage(settings, args)
            if results["curate"]["status"] != "created":
                _emit(results, args.as_json)
                return 0
            snapshot_id = results["curate"]["id"]
        if args.train:
            results["train"] = train_stage(settings, args, snapshot_id)
            version = results["train"]["version"]
        if args.evaluate:
            results["eval"] = eval_stage(settings, args, version)
    except CLError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    _emit(results, args.as_json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
