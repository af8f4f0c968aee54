"""Synthetic chat turns for the sanitizer benchmark: everyday questions and answers about a plant, each made
distinct by its own identifiers, and about 1 in 5 carrying PII or a secret from the tuning and dev corpora (never
the held-out one). Deterministic for a given count."""
from __future__ import annotations

import random
from pathlib import Path

import orjson

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"
CORPUS_FILES = [DATA / "pii_corpus.jsonl", DATA / "privacy_tuning.jsonl", DATA / "privacy_dev.jsonl"]

QUESTIONS = [
    "How do I reset the controller to factory defaults?",
    "what's the recommended cure time for epoxy at room temperature?",
    "Can you summarise the maintenance checklist for the press?",
    "why does the conveyor stop when the sensor is dusty",
    "Explain the difference between torque and power in simple terms.",
    "thanks, that worked",
    "Is it safe to run the oven overnight with the door closed?",
    "How often should the hydraulic oil be changed?",
    "give me three tips for reducing scrap on the lathe",
    "What does error E42 mean on the welding unit?",
    "Write a short note to the team about the new safety shoes policy.",
    "ok and what about the second filter?",
    "Which grease should I use for the main bearing?",
    "can you translate 'quality check passed' into German",
    "What is the capital of France?",
]
ANSWERS = [
    "Hold the reset button for ten seconds until the status light blinks twice, then release it and wait for the "
    "controller to restart. Your settings will be back to the factory values.",
    "Most two-part epoxies cure in about 24 hours at room temperature; full strength takes up to seven days.",
    "Check the hydraulic pressure, inspect the guards, lubricate the slides and test the emergency stop before "
    "each shift.",
    "A dusty sensor can read as blocked, so the conveyor stops to protect the line. Clean the lens with a dry cloth.",
    "Torque is the twisting force; power is how fast that force does work. More torque helps start heavy loads.",
    "Glad it helped! Let me know if anything else comes up.",
    "Running it overnight is fine if the temperature limit and the automatic shut-off are set, but never leave it "
    "unattended for days.",
    "Change hydraulic oil every 2,000 operating hours or once a year, whichever comes first.",
    "Keep tools sharp, measure the first part of every batch, and log each rejected piece with its cause.",
    "Error E42 usually means the wire feed motor is overloaded. Check the liner for kinks and the spool brake.",
    "Team, from Monday safety shoes are required on the shop floor. Please collect yours from stores this week.",
    "The second filter is cleaned the same way; replace it when the pressure drop exceeds the mark on the gauge.",
    "Use a lithium complex grease rated for high temperature; avoid mixing it with the old grease type.",
    "In German: 'Qualitätsprüfung bestanden'.",
    "The capital of France is Paris.",
]


def corpus() -> list[dict]:
    return [orjson.loads(line) for path in CORPUS_FILES for line in path.read_bytes().splitlines() if line.strip()]


def _details(rng: random.Random) -> str:
    """A short tail that makes each turn distinct the way real turns are: their own lots, parts and numbers."""
    return rng.choice([
        f"This is about lot {rng.choice('ABCDEFGH')}-{rng.randint(1, 999)}.",
        f"Part PX-{rng.randint(100, 99999)} is affected.",
        f"We saw it on line {rng.randint(1, 12)} at {rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}.",
        f"Order ORD-2026-{rng.randint(1, 9999):04d} depends on it.",
        f"Firmware v{rng.randint(1, 9)}.{rng.randint(0, 20)}.{rng.randint(0, 30)} is installed.",
        f"It happened {rng.randint(2, 40)} times this week.",
        f"The reading was {rng.randint(20, 400)}°C.",
        "",
    ])


def chat_turns(count: int, pii_share: float = 0.2, seed: int = 0) -> list[str]:
    """`count` distinct texts: user questions and assistant answers, about `pii_share` of them with a corpus line."""
    rng = random.Random(seed)
    rows = [r for r in corpus() if r.get("pii") or r.get("values")]
    texts: list[str] = []
    seen: set[str] = set()
    while len(texts) < count:
        roll = rng.random()
        if roll < pii_share:
            text = f"{rng.choice(rows)['text']} {_details(rng)}".strip()
        else:
            text = f"{rng.choice(QUESTIONS if len(texts) % 2 == 0 else ANSWERS)} {_details(rng)}".strip()
        if text not in seen:
            seen.add(text)
            texts.append(text)
    return texts
