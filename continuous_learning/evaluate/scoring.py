"""Keyword scoring (pure): an answer passes when its keywords appear in it (case-, whitespace- and Unicode-form-
insensitive, not glued to a longer word or number) and none of its forbidden words do."""
from __future__ import annotations

import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class EvalItem:
    prompt: str
    keywords: tuple[str, ...]
    match: str = "all"
    forbidden: tuple[str, ...] = ()


def normalise(text: str) -> str:
    """NFKC (full-width forms, ligatures, composed accents), casefold (ß = ss), one space for any whitespace run."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def contains_keyword(text: str, keyword: str) -> bool:
    """`keyword` (normalised) occurs in the normalised `text`, not glued to a longer word or number: a keyword
    that starts with a Latin letter or digit must start a word ("cold" is not in "scolded"), and a number must
    be whole ("4" is not in "24", "14" or "1.4"). Words may go on ("euro" is in "euros")."""
    word = normalise(keyword)
    start = text.find(word) if word else -1
    while start >= 0:
        if _whole(text, start, start + len(word), word):
            return True
        start = text.find(word, start + 1)
    return False


def _whole(text: str, begin: int, end: int, word: str) -> bool:
    before, after = text[begin - 1 : begin], text[end : end + 1]
    if _latin_alnum(word[0]) and _latin_alnum(before):
        return False
    if word[0].isdigit() and before in (".", ",") and begin >= 2 and text[begin - 2].isdigit():
        return False
    if word[-1].isdigit() and (after.isdigit() or (after in (".", ",") and text[end + 1 : end + 2].isdigit())):
        return False
    return True


def _latin_alnum(char: str) -> bool:
    return bool(char) and char.isascii() and char.isalnum()


def score_answer(answer: str, item: EvalItem | Mapping[str, Any]) -> bool:
    item = item if isinstance(item, EvalItem) else _item_from_mapping(item)
    text = normalise(answer)
    if any(contains_keyword(text, word) for word in item.forbidden):
        return False
    found = [contains_keyword(text, word) for word in item.keywords]
    return any(found) if item.match == "any" else all(found)


def _item_from_mapping(data: Mapping[str, Any]) -> EvalItem:
    return EvalItem(
        prompt=data.get("prompt", ""),
        keywords=tuple(data.get("keywords") or ()),
        match=data.get("match", "all"),
        forbidden=tuple(data.get("forbidden") or ()),
    )


def score_items(items: list[EvalItem], answers: list[str]) -> dict:
    rows = [{"prompt": item.prompt, "passed": score_answer(answer, item), "answer": answer}
            for item, answer in zip(items, answers)]
    passed = sum(row["passed"] for row in rows)
    return {"accuracy": passed / len(rows) if rows else 0.0, "passed": passed, "total": len(rows), "items": rows}


def score_under_prompts(items: list[EvalItem], answers_by_prompt: list[list[str]],
                        system_prompts: list[str | None]) -> dict:
    """`score_items` of the first prompt's answers (the ones shown), plus each question's `score`: the share of
    the system prompts under which it passed, and the part's total `score`."""
    scored = score_items(items, answers_by_prompt[0])
    for k, row in enumerate(scored["items"]):
        passed = [score_answer(answers[k], items[k]) for answers in answers_by_prompt]
        row.update(passed_under=passed, score=sum(passed) / len(passed))
    scored.update(score=sum(row["score"] for row in scored["items"]), system_prompts=list(system_prompts))
    return scored
