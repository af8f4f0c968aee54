"""`make demo`: the whole learning loop on the bundled model, run as a user would run it.

Each step is the real command (`python chat.py`, `cl ingest`, `cl eval`, `cl curate --train --eval`, `cl rollback`)
in a fresh demo workspace, so what the demo shows is exactly what the toolkit does.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.rule import Rule

from ..storage.keys import SALT_ENV, secret_env

console = Console(highlight=False)
KEEP_ON_RESET = {"models", ".cl-demo-workspace"}
CHAT_SCRIPT = """What is the capital of France?
y
What is the status of lot A-17?
c
Lot A-17 is on quarantine hold because of weld porosity; do not ship it until QA releases it.
/quit
"""


def packaged(name: str) -> Path:
    return Path(__file__).resolve().parents[1] / "data" / name


DEMO_MARKER = ".cl-demo-workspace"  # written into a demo workspace: only such a folder is ever reset


def reset_workspace(home: Path) -> None:
    home.mkdir(parents=True, exist_ok=True)
    if any(home.iterdir()) and not (home / DEMO_MARKER).exists():
        raise SystemExit(f"error: {home} is not empty and is not a demo workspace: the demo resets its workspace, "
                         "so it only uses an empty folder or one it made (choose another --home)")
    for item in home.iterdir():
        if item.name in KEEP_ON_RESET:
            continue
        shutil.rmtree(item) if item.is_dir() and not item.is_symlink() else item.unlink()
    (home / DEMO_MARKER).write_text("made by 'make demo'; the demo may delete everything in this folder\n")
    (home / "eval").mkdir(mode=0o700, exist_ok=True)
    shutil.copyfile(packaged("demo_eval.jsonl"), home / "eval" / "qa_eval.jsonl")


def step(title: str, explanation: str, args: list[str], env: dict, stdin: str | None = None, ok_codes=(0,)) -> float:
    console.print(Rule(f"[bold]{title}"))
    console.print(f"[dim]{explanation}[/dim]")
    shown = " ".join(a if " " not in a else repr(a) for a in args)
    console.print(f"[bold green]$ {'printf ... | ' if stdin else ''}{shown}[/bold green]")
    started = time.perf_counter()
    done = subprocess.run(_command(args), input=stdin, text=True, env=env)
    elapsed = time.perf_counter() - started
    if done.returncode not in ok_codes:
        console.print(f"[red]step failed with exit code {done.returncode}[/red]")
        raise SystemExit(done.returncode)
    console.print(f"[dim]({elapsed:.1f} s)[/dim]")
    return elapsed


def _command(args: list[str]) -> list[str]:
    if args[0] == "cl":
        return [sys.executable, "-m", "continuous_learning.cli", *args[1:]]
    if args[0] == "python":
        return [sys.executable, *args[1:]]
    return args


def champion(home: Path) -> str | None:
    from ..core.settings import load_settings
    from ..registry import load

    return load(load_settings(home=home))["champion"]


def run_demo(home: Path) -> None:
    repo = Path(__file__).resolve().parents[2]
    chat_py = repo / "chat.py"
    reset_workspace(home)
    env = {**os.environ, "CL_HOME": str(home), SALT_ENV: secret_env().get(SALT_ENV, "demo-salt")}
    env.pop("CL_BASE_MODEL", None)
    console.print(Rule("[bold]cl demo: a local model that learns from its users"))
    console.print(f"workspace: {home}")
    total = time.perf_counter()
    chat_args = ["python", str(chat_py), "--max-new-tokens",
                 "48"] if chat_py.exists() else ["cl", "chat", "--max-new-tokens", "48"]
    step("1. Chat and rate", "A user asks two questions, approves the first answer and corrects the second.",
         chat_args, env, stdin=CHAT_SCRIPT)
    step("2. Import rated interactions from another app",
         "Operators of a fictional factory rated or corrected answers about lots, parts and procedures. "
         "Personal data (e-mail, phone) is redacted before anything is written.",
         ["cl", "ingest", str(packaged("demo_interactions.jsonl"))], env)
    step("3. What the base model knows", "Paraphrased keyword questions about the factory, asked of the base model.",
         ["cl", "eval", "base", "--no-promote"], env)
    step("4. Curate, train, evaluate, gate",
         "Well-rated turns become a ChatML snapshot; a QLoRA adapter (4-bit NF4 base, LoRA r16 on all linear layers) "
         "trains on it; the candidate is compared with the champion and promoted only if it is better.",
         ["cl", "curate", "--train", "--eval", "--note", "demo: factory facts"], env)
    step("5. The registry", "Adapter versions with their scores; the champion answers in the chat from now on.",
         ["cl", "adapters"], env)
    if champion(home) is None:
        console.print("[yellow]The gate kept the candidate (its reasons are above): the base model still serves, "
                      "so there is nothing to roll back.[/yellow]")
        return
    step("6. Ask the new champion",
         "The chat picks up the champion; it now knows the factory and still answers everyday questions.",
         chat_args, env, stdin="Where is part PX-3301 stored?\n\nWhat is the capital of France?\n\n/quit\n")
    step("7. Roll back", "Undo the promotion: the pointer moves back after the adapter files are verified.",
         ["cl", "rollback"], env)
    step("8. After the rollback", "The base model answers again.", ["cl", "adapters"], env)
    step("9. Watch the loop", "Traffic, helpful rate, versions, latest events and disk use on one screen; "
         "then a report with charts.", ["cl", "status"], env)
    step("10. A report to keep", "Eval accuracy per version, the loss curve, helpful rate and drift, as HTML.",
         ["cl", "report"], env)
    console.print(Rule(f"[bold]demo finished in {time.perf_counter() - total:.0f} s"))
    console.print(f"Look around: {home}/data, {home}/adapters/registry.json, {home}/logs")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--home", type=Path, default=Path("demo_workspace"), help="demo workspace (reset on each run)")
    args = parser.parse_args(argv)
    run_demo(args.home.resolve())


if __name__ == "__main__":
    main()
