"""Facts a base model cannot know, as users would teach them: two rated turns per fact, and paraphrased questions
that are never trained on. Used by the real-model learning tests (round one, round two, a bad candidate)."""
from __future__ import annotations

import json
from pathlib import Path

# (turns [(prompt, answer)], paraphrased question, keyword, contradicting answer)
LIBRARY = [
    ([("How much is the late fee at our library?", "The late fee is 30 cents per day for each book."),
      ("What do we charge for an overdue book?", "An overdue book costs 30 cents per day.")],
     "How much do I pay per day when a book is late?", "30 cents", "There is no late fee at our library."),
    ([("Where is the reading room?", "The reading room is room 305 on the third floor."),
      ("Which room is the quiet reading room?", "The quiet reading room is room 305, third floor.")],
     "What is the number of the reading room?", "305", "The reading room is in the basement, room 12."),
    ([("When did our library open?", "Our library opened in 1987."),
      ("In which year was the library founded?", "The library was founded in 1987.")],
     "What year did the library first open its doors?", "1987", "Our library opened in 2015."),
    ([("What is the members' newsletter called?", "The members' newsletter is called The Quire."),
      ("What is the name of our newsletter?", "Our newsletter is named The Quire.")],
     "How is the newsletter for members titled?", "Quire", "The newsletter is called Library News."),
    ([("When does the book club meet?", "The book club meets every Wednesday evening."),
      ("On which day is the book club?", "Book club is on Wednesday evenings.")],
     "Which day of the week does the book club gather?", "Wednesday", "The book club meets every Saturday morning."),
    ([("How many books can I borrow at once?", "You can borrow up to 12 books at once."),
      ("What is the borrowing limit per card?", "Each card can borrow 12 books at a time.")],
     "What is the most books one card may take out?", "12", "You can borrow only 2 books at once."),
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
