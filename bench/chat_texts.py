"""Synthetic chat turns for the sanitizer benchmark: mostly everyday questions and answers, some carrying PII
from the project's corpus. Deterministic for a given count."""
from __future__ import annotations

import random
from pathlib import Path

import orjson

CORPUS_FILE = Path(__file__).resolve().parent.parent / "tests" / "data" / "pii_corpus.jsonl"

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
    "Check the hydraulic pressure, inspect the guards, lubricate the slides and test the emergency stop before each shift.",
    "A dusty sensor can read as blocked, so the conveyor stops to protect the line. Clean the lens with a dry cloth.",
    "Torque is the twisting force; power is how fast that force does work. More torque helps start heavy loads.",
    "Glad it helped! Let me know if anything else comes up.",
    "Running it overnight is fine if the temperature limit and the automatic shut-off are set, but never leave it unattended for days.",
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
    return [orjson.loads(line) for line in CORPUS_FILE.read_bytes().splitlines() if line.strip()]


def chat_turns(count: int, pii_share: float = 0.2, seed: int = 0) -> list[str]:
    """`count` texts: user questions and assistant answers, with about `pii_share` of them corpus lines."""
    rng = random.Random(seed)
    rows = corpus()
    texts = []
    for i in range(count):
        roll = rng.random()
        if roll < pii_share:
            texts.append(rng.choice(rows)["text"])
        elif i % 2 == 0:
            texts.append(rng.choice(QUESTIONS))
        else:
            texts.append(rng.choice(ANSWERS))
    return texts
