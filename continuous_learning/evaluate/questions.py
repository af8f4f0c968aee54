"""The questions an evaluation asks: keyword eval files (validated line by line), the shipped everyday set, and,
without a keyword file, questions derived from a snapshot's conversations."""
from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from .. import registry
from ..core.errors import InputError
from ..core.settings import SHIPPED_DATA, Settings
from .scoring import EvalItem, normalise
from .snapshots import load_messages_file, snapshot_eval_path

GENERAL_FILE = SHIPPED_DATA / "general_qa.jsonl"
MATCH_MODES = ("all", "any")
EXAMPLE_LINE = '{"prompt": "What is the capital of France?", "keywords": ["Paris"]}'
LINE_FORMAT = f'one JSON object per line, e.g. {EXAMPLE_LINE} (optional "match": "all"|"any", "forbidden": [...])'


def parse_eval_item(data: Any, where: str) -> EvalItem:
    """One eval line, validated; `where` ("file, line N") prefixes every complaint."""

    def bad(what: str) -> InputError:
        return InputError(f"{where}: {what}", f"each line needs {LINE_FORMAT}")

    if not isinstance(data, dict):
        raise bad("expected a JSON object")
    prompt = data.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise bad("'prompt' must be a non-empty string")
    keywords = _word_list(data.get("keywords"), "keywords", bad)
    if not keywords:
        raise bad("'keywords' must list at least one keyword")
    match = data.get("match", "all")
    if match not in MATCH_MODES:
        raise bad(f"'match' must be \"all\" or \"any\", got {match!r}")
    forbidden = _word_list(data.get("forbidden", []), "forbidden", bad)
    return EvalItem(prompt=prompt, keywords=keywords, match=match, forbidden=forbidden)


def _word_list(value: Any, name: str, bad: Callable[[str], InputError]) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(w, str) and w.strip() for w in value):
        raise bad(f"'{name}' must be a list of non-empty strings")
    return tuple(value)


def parse_eval_lines(lines: Iterable[bytes | str], source: str) -> list[EvalItem]:
    items: list[EvalItem] = []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        where = f"{source}, line {number}"
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise InputError(f"{where}: not valid JSON ({exc})", f"each line needs {LINE_FORMAT}") from None
        items.append(parse_eval_item(data, where))
    if not items:
        raise InputError(f"{source} has no eval questions", f"add {LINE_FORMAT}")
    return items


def load_eval_file(path: Path) -> list[EvalItem]:
    if not path.is_file():
        raise InputError(f"no eval file at {path}", f"create it with {LINE_FORMAT}, or pass --eval-file PATH")
    return parse_eval_lines(path.read_bytes().splitlines(), str(path))


def default_eval_file(settings: Settings) -> Path:
    return settings.resolve_in_home(settings.eval.eval_file)


def general_file(settings: Settings) -> Path:
    return settings.resolve_in_home(settings.eval.general_file) if settings.eval.general_file else GENERAL_FILE


def file_info(settings: Settings, path: Path) -> dict:
    path = path.resolve()
    shown = str(path.relative_to(settings.home)) if path.is_relative_to(settings.home) else str(path)
    return {"name": path.name, "path": shown, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


PLACEHOLDER = re.compile(r"<[A-Z][A-Z0-9_]{2,}>")
_WORD = re.compile(r"[^\W_][\w'’:./-]*[^\W_]|[^\W_]", re.UNICODE)


_STOPWORDS = frozenset("""about above after again against because before being below between could during every
other should their there these those through under until which while would yours itself where whose really always
usually never sometimes answer question please thanks hello""".split())


def answer_keyword(prompt: str, answer: str) -> str | None:
    """The word of `answer` that best shows the fact was recalled: the first token with a digit that the prompt
    does not contain ("2:30", "412"), else a capitalised word inside a sentence ("Thursday", "Atlas"), else the
    longest content word of five letters or more ("quarantine"). None when nothing qualifies."""
    asked = {normalise(w) for w in _WORD.findall(prompt)}
    words = [(m.group(0), m.start()) for m in _WORD.finditer(PLACEHOLDER.sub(" ", answer))]
    fresh = [(w, at) for w, at in words if normalise(w) not in asked]
    for word, _ in fresh:
        if any(c.isdigit() for c in word):
            return word
    for word, at in fresh:
        starts_sentence = not answer[:at].strip() or answer[:at].rstrip()[-1] in ".!?:;"
        if word[0].isupper() and len(word) >= 3 and not starts_sentence and word.lower() not in _STOPWORDS:
            return word
    content = [w for w, _ in fresh if w.isalpha() and len(w) >= 5 and w.lower() not in _STOPWORDS]
    return max(content, key=len) if content else None


def derive_items(conversations: Iterable[list[dict]]) -> list[EvalItem]:
    """Keyword questions from curated conversations: the last user prompt, and the keyword of its answer."""
    items, seen = [], set()
    for messages in conversations:
        prompt = next((m["content"] for m in reversed(messages[:-1]) if m.get("role") == "user"), "")
        keyword = answer_keyword(prompt, messages[-1].get("content", "")) if prompt.strip() else None
        if keyword and normalise(prompt) not in seen:
            seen.add(normalise(prompt))
            items.append(EvalItem(prompt=prompt, keywords=(keyword,)))
    return items


@dataclass(frozen=True)
class TargetSet:
    """The target questions of an evaluation and where they come from (shown with every result)."""

    items: list[EvalItem]
    info: dict


def items_sha256(items: list[EvalItem]) -> str:
    data = [[i.prompt, list(i.keywords), i.match, list(i.forbidden)] for i in items]
    return hashlib.sha256(orjson.dumps(data)).hexdigest()


MAX_DERIVED = 24


def target_set(settings: Settings, doc: dict, eval_file: Path | str | None, snapshot: str | None) -> TargetSet:
    """The workspace's keyword file (or `eval_file`); without one, questions derived from `snapshot`: its
    held-out slice, topped up with its training examples when that gives fewer than eval.min_questions."""
    path = Path(eval_file) if eval_file else default_eval_file(settings)
    if eval_file or path.is_file() or snapshot is None:
        return TargetSet(load_eval_file(path), file_info(settings, path))
    snap = registry.find_snapshot(doc, snapshot)
    held_out = snapshot_eval_path(settings, snap)
    items = derive_items(load_messages_file(held_out)) if held_out else []
    sources = ["held-out slice"] if items else []
    if len(items) < settings.eval.min_questions:
        train = registry.confined(settings, snap["file"])
        prompts = {normalise(i.prompt) for i in items}
        taught = [i for i in derive_items(load_messages_file(train)) if normalise(i.prompt) not in prompts]
        if taught:
            items += taught[: max(0, MAX_DERIVED - len(items))]
            sources.append("training examples (recall of what was taught)")
    if not items:
        raise InputError(
            f"no {path.relative_to(settings.home) if path.is_relative_to(settings.home) else path} and no question "
            f"could be derived from snapshot {snapshot}", f"create it with {LINE_FORMAT}, or pass --eval-file PATH")
    name = f"derived from snapshot {snapshot}: " + " + ".join(sources)
    return TargetSet(items, {"name": name, "path": None, "sha256": items_sha256(items), "derived": True})


def check_eval_ready(settings: Settings, eval_file: Path | str | None = None) -> str:
    """What `--eval` will use, checked BEFORE any training: a bad keyword file fails now, not after training.
    Returns a one-line description for the user."""
    path = Path(eval_file) if eval_file else default_eval_file(settings)
    if eval_file or path.is_file():
        items = load_eval_file(path)
        general = load_eval_file(general_file(settings))
        return f"evaluating on {len(items)} questions of {path.name} and {len(general)} everyday questions"
    load_eval_file(general_file(settings))
    return (f"no {settings.eval.eval_file}: evaluating on questions derived from the new snapshot and the shipped "
            "everyday set (write your own keyword questions there for a real test)")
