"""The loop as a new user runs it: a dozen rated turns of new facts and their own keyword questions, then
`cl curate --train --eval --json` on the defaults, timed whole. The goal is absolute (a dozen new examples train,
evaluate and gate in under 5 minutes on 2 CPU cores), so the ratio is the budget over the measured time. Whether
the run found the once-per-machine material ready (the base's rehearsal reference and its everyday answers, from
the machine cache or shipped with the package) is recorded: computing them adds a one-time cost to that run."""
from __future__ import annotations

import shutil
import sys

import orjson

from .common import child_env, median, result, run_measured
from .workspaces import apply_env, new_home, workspace_env

GOAL_S = 300.0
# (taught turns, paraphrased question, keyword): facts the base model cannot know, two phrasings each
FACTS = [
    (("When does the workshop open?", "The workshop opens at 7:15 am."),
     ("What time can I get into the workshop?", "You can get into the workshop from 7:15 am."),
     "When does our workshop open its doors?", "7:15"),
    (("Which forklift is reserved for the loading dock?", "Forklift number 17 is reserved for the loading dock."),
     ("What forklift do we use at the loading dock?", "We use forklift 17 at the loading dock."),
     "Which forklift belongs to the loading dock?", "17"),
    (("What colour are the safety helmets for visitors?", "Visitors wear orange safety helmets."),
     ("Which helmet colour do visitors get?", "Visitors get orange helmets."),
     "What colour helmet does a visitor wear?", "orange"),
    (("How long is the lunch break on the night shift?", "The night shift lunch break lasts 40 minutes."),
     ("How many minutes is the night-shift lunch?", "Lunch on the night shift is 40 minutes long."),
     "How long do night-shift workers get for lunch?", "40"),
    (("Where are spare gloves kept?", "Spare gloves are kept in locker C."),
     ("Which locker holds the spare gloves?", "Locker C holds the spare gloves."),
     "In what locker can I find spare gloves?", "locker c"),
    (("On which day is the fire drill?", "The fire drill is held every Wednesday."),
     ("When do we run the fire drill?", "We run the fire drill on Wednesdays."),
     "Which weekday is the fire drill on?", "wednesday"),
]


def write_inputs(home) -> tuple:
    turns, questions = home / "turns.jsonl", home / "eval" / "qa_eval.jsonl"
    questions.parent.mkdir(parents=True, exist_ok=True)
    lines = [{"prompt": p, "response": a, "user_id": f"worker-{k}-{j}", "feedback": {"helpful": True}}
             for k, (*taught, _, _) in enumerate(FACTS) for j, (p, a) in enumerate(taught)]
    turns.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))
    questions.write_bytes(b"".join(orjson.dumps({"prompt": q, "keywords": [kw]}) + b"\n" for *_, q, kw in FACTS))
    return turns, len(lines)


def once_per_machine_work(train: dict, evaluation: dict) -> dict:
    """Whether the run found the once-per-machine material ready (in the machine cache, or shipped with the package
    for the bundled model on the defaults) instead of computing it: the base's KL targets on the rehearsal answers
    and its scored everyday answers."""
    against = evaluation.get("against") or {}
    return {"rehearsal_reference": "kl_reference_s" not in (train.get("timings") or {}),
            "base_everyday_answers": "everyday" in (against.get("reused") or [])}


def one_loop(repeat: int) -> dict:
    """A fresh workspace: ingest, then the timed `cl curate --train --eval --json`."""
    home = new_home(f"loop{repeat}")
    try:
        env = workspace_env(home)
        apply_env(env)
        turns, count = write_inputs(home)
        cli = [sys.executable, "-m", "continuous_learning.cli"]
        ingest = run_measured([*cli, "ingest", str(turns)], env=child_env(**env))
        if ingest["returncode"] != 0:
            raise RuntimeError(f"cl ingest failed: {ingest['stderr'][-800:]}")
        run = run_measured([*cli, "curate", "--train", "--eval", "--json"], env=child_env(**env))
        if run["returncode"] != 0:
            raise RuntimeError(f"cl curate --train --eval failed: {run['stderr'][-800:]}")
        report = orjson.loads(run["stdout"][run["stdout"].index("{"):])
        train, evaluation = report.get("train") or {}, report.get("eval") or {}
        warm = once_per_machine_work(train, evaluation)
        return {"seconds": round(run["seconds"], 1), "peak_rss_mb": run["peak_rss_mb"], "turns": count,
                "warm_cache": warm, "steps": (train.get("metrics") or {}).get("steps"),
                "train_s": round((train.get("metrics") or {}).get("seconds") or 0.0, 1),
                "timings": train.get("timings", {}), "promoted": evaluation.get("promoted"),
                "target_passed": (evaluation.get("subject") or {}).get("passed"),
                "decision": (evaluation.get("decision") or {}).get("summary")}
    finally:
        shutil.rmtree(home, ignore_errors=True)


def run(repeats: int, quick: bool) -> dict:
    if quick:  # the real model is the point here: a tiny random one neither learns nor takes a real time
        return result("loop", "none (an absolute goal)", f"< {GOAL_S:.0f} s", None, False, {"skipped": "quick"},
                      "not run with --quick", why_missed="not run with --quick",
                      summary="not run with --quick (needs the bundled model)")
    runs = [one_loop(k) for k in range(max(1, min(repeats, 2)))]  # each repeat trains the real model once
    warm = [r for r in runs if all(r["warm_cache"].values())]
    judged = warm or runs
    seconds = median([r["seconds"] for r in judged])
    met = bool(warm) and seconds < GOAL_S
    first = judged[0]
    raw = {"runs": runs, "judged_on": "warm-cache runs" if warm else "cold-cache runs (no warm run)",
           "seconds_min_max": [min(r["seconds"] for r in judged), max(r["seconds"] for r in judged)]}
    why = "" if met else (f"the median warm run took {seconds:.0f} s" if warm
                          else "every run had a cold machine cache, which adds once-per-machine work")
    return result(
        "loop", "none (an absolute goal: the issue's 5-minute budget)", f"< {GOAL_S:.0f} s for a dozen new examples",
        round(GOAL_S / seconds, 2) if seconds > 0 else None, met, raw,
        f"training {first['train_s']} s of {first['seconds']} s ({first['steps']} steps); timings {first['timings']}",
        why_missed=why,
        summary=(f"`cl curate --train --eval` on {first['turns']} rated turns: {seconds:.0f} s (median of "
                 f"{len(judged)}, {raw['judged_on']}); promoted: {first['promoted']}, target questions passed "
                 f"{first['target_passed']} of {len(FACTS)}."),
    )
