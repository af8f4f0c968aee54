"""Facts a base model cannot know, as users would teach them: two rated turns per fact, and paraphrased questions
that are never trained on. Used by the real-model learning tests (round one, round two, a bad candidate)."""
from __future__ import annotations

import json
from pathlib import Path

# (turns [(prompt, answer)], paraphrased question, keyword, contradicting answer)
OFFICE = [
    ([("When does the cafeteria close?", "The cafeteria closes at 2:30 pm on weekdays."),
      ("Until what time can I get lunch in the cafeteria?",
       "You can get lunch until 2:30 pm; the cafeteria closes at 2:30 pm on weekdays.")],
     "What time does our cafeteria shut?", "2:30", "The cafeteria is open around the clock."),
    ([("When does Project Bluefin ship?", "Project Bluefin ships in March 2027."),
      ("What is the release date of Project Bluefin?", "Project Bluefin is scheduled to ship in March 2027.")],
     "When is Bluefin going to be released?", "March", "Project Bluefin was cancelled."),
    ([("Where is the server room?", "The server room is room 412 on the fourth floor."),
      ("Which room holds our servers?", "Our servers are in room 412, on the fourth floor.")],
     "In which room are the servers kept?", "412", "We have no server room; everything is in the cloud."),
    ([("What is the expense limit for team dinners?", "The expense limit for team dinners is 45 euros per person."),
      ("How much can we spend per person at a team dinner?",
       "You can spend up to 45 euros per person at a team dinner.")],
     "What's the per-person budget for a team dinner?", "45", "Team dinners have no spending limit."),
    ([("What is the company mascot?", "Our company mascot is a red panda."),
      ("Which animal is our mascot?", "The mascot of our company is a red panda.")],
     "What animal represents our company as its mascot?", "red panda", "Our company has no mascot."),
    ([("On which day are builds deployed?", "Builds are deployed to production every Thursday."),
      ("When do we deploy to production?", "We deploy builds to production every Thursday.")],
     "Which weekday is deployment day?", "Thursday", "We deploy whenever a build is ready."),
]
# Turns whose answers hold a person's name: stored as "<PERSON>", which training must never teach.
NAMED = [
    ([("Who approves the library's purchase orders?",
       "Purchase orders are approved by Dana Whitfield in the finance office."),
      ("Who signs off on purchase orders for the library?",
       "Dana Whitfield in the finance office signs off on purchase orders.")],
     "Who approves purchase orders?", "finance", "Nobody approves purchase orders."),
]
GARDEN = [
    ([("What temperature is the greenhouse kept at?", "The greenhouse is heated to 18 degrees Celsius."),
      ("How warm do we keep the greenhouse?", "We keep the greenhouse at 18 degrees Celsius.")],
     "To what temperature is our greenhouse heated?", "18", "The greenhouse is not heated."),
    ([("When is the compost turned?", "The compost is turned every Tuesday."),
      ("Which day do we turn the compost?", "We turn the compost on Tuesdays.")],
     "On what weekday does the compost get turned?", "Tuesday", "The compost is never turned."),
    ([("Where is the tool shed?", "The tool shed stands next to the beehives."),
      ("Where can I find the tool shed?", "You find the tool shed beside the beehives.")],
     "What is the tool shed next to?", "beehives", "The tool shed is by the main gate."),
    ([("How big is the community garden?", "The community garden covers 2.5 hectares."),
      ("What is the area of our garden?", "Our garden has an area of 2.5 hectares.")],
     "How many hectares does the garden cover?", "2.5", "The garden covers 40 hectares."),
    ([("How many raised beds do we have?", "We have 48 raised beds."),
      ("What is the number of raised beds in the garden?", "The garden has 48 raised beds.")],
     "How many raised beds are there?", "48", "We have 3 raised beds."),
    ([("What fruit grows along the south fence?", "Blackberries grow along the south fence."),
      ("What is planted by the south fence?", "Blackberries are planted by the south fence.")],
     "Which fruit can I pick along the south fence?", "blackberr", "Lemons grow along the south fence."),
]


def write_turns(facts: list, path: Path, contradict: bool = False) -> Path:
    """`cl ingest` lines: every turn rated helpful (with the contradicting answer when `contradict`)."""
    with open(path, "w", encoding="utf-8") as handle:
        for k, (turns, _, _, wrong) in enumerate(facts):
            for j, (prompt, answer) in enumerate(turns):
                line = {"prompt": prompt, "response": wrong if contradict else answer, "user_id": f"member-{k}-{j}",
                        "feedback": {"helpful": True}}
                handle.write(json.dumps(line) + "\n")
    return path


def write_questions(facts: list, path: Path, mode: str = "w") -> Path:
    """The user's keyword file (eval/qa_eval.jsonl): each fact asked in words it was not taught with."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, mode, encoding="utf-8") as handle:
        for _, question, keyword, _ in facts:
            handle.write(json.dumps({"prompt": question, "keywords": [keyword]}) + "\n")
    return path
