"""`python -m continuous_learning.pipeline`: the learning loop's stages, run in order.

The flags are derived from `LoopOptions` (see `workflow`); `main` hands them to `run_loop` and prints the
results of the stages that ran.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from typing import Any

import orjson

from ..core.errors import CLError
from ..core.settings import load_settings
from .workflow import EVAL, Events, LoopOptions, NoEvents, describe_curate, run_loop

PIPELINE_OPTIONS = ("curate", "full", "include_unrated", "train", "evaluate", "promote", "note")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m continuous_learning.pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--home", help="Workspace root (default: CL_HOME or the current folder).")
    by_name = {f.name: f for f in fields(LoopOptions)}
    for name in PIPELINE_OPTIONS:
        add_option_flag(parser, by_name[name])
    parser.add_argument("--json", dest="as_json", action="store_true", help="Print the results as JSON.")
    return parser


def add_option_flag(parser: argparse.ArgumentParser, option: Any) -> None:
    """One argparse flag for a LoopOptions field: on/off switches for booleans, a value otherwise."""
    meta = option.metadata
    flag = meta.get("flag") or "--" + option.name.replace("_", "-")
    help_text = meta.get("flag_help") or meta["help"]
    if option.default is True:
        parser.add_argument(flag, dest=option.name, action="store_false", help=help_text)
    elif option.default is False:
        parser.add_argument(flag, dest=option.name, action="store_true", help=help_text)
    elif option.type in ("bool | None", bool | None):  # on, or the configured default
        parser.add_argument(flag, dest=option.name, action="store_const", const=True, default=None, help=help_text)
    else:
        parser.add_argument(flag, dest=option.name, help=help_text)


class _PrintPlan(NoEvents):
    """The eval plan (said before any stage starts) goes to stderr; nothing is shown while the stages run."""

    def __init__(self) -> None:
        self.running = False

    def started(self, stage: str) -> None:
        self.running = True

    def status(self, stage: str, message: str) -> None:
        if stage == EVAL and not self.running:
            print(message, file=sys.stderr)


def _emit(results: dict[str, Any], as_json: bool) -> None:
    if as_json:
        sys.stdout.write(orjson.dumps(results, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    if "curate" in results:
        print(describe_curate(results["curate"]))
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
    options = LoopOptions(**{name: getattr(args, name) for name in PIPELINE_OPTIONS})
    events: Events = NoEvents() if args.as_json else _PrintPlan()
    try:
        results = run_loop(load_settings(home=args.home), options, events)
    except CLError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    _emit(results, args.as_json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
