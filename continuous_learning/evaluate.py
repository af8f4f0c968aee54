"""Keyword QA evaluation: pure scoring, eval-file loading, and a batched runner over adapter versions.

An answer passes when its keywords appear in it (case-, whitespace- and Unicode-form-insensitive). The runner
loads the base model once, switches adapters per version, answers every prompt greedily in batches and, when a
snapshot's held-out slice is given, measures its loss on the final assistant message. torch is imported only
inside the functions that need it.
"""
from __future__ import annotations

import hashlib
import math
import re
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import orjson

from . import decisions, preference, registry
from .storage.crypto import cipher_from_env, open_messages
from .decisions import BASE, Decision, gate, label  # noqa: F401  (gate is part of this module's API)
from .storage.store import atomic_write_json, read_json
from .core.errors import InputError, RegistryError
from .core.records import utc_now
from .core.settings import Settings

GENERAL_FILE = Path(__file__).parent / "data" / "general_qa.jsonl"
MATCH_MODES = ("all", "any")
EXAMPLE_LINE = '{"prompt": "What is the capital of France?", "keywords": ["Paris"]}'
LINE_FORMAT = f'one JSON object per line, e.g. {EXAMPLE_LINE} (optional "match": "all"|"any", "forbidden": [...])'
Progress = Callable[[str], None]


# --- scoring (pure) --------------------------------------------------------------------------------------
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


# --- eval files ------------------------------------------------------------------------------------------
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


def score_items(items: list[EvalItem], answers: list[str]) -> dict:
    rows = [{"prompt": item.prompt, "passed": score_answer(answer, item), "answer": answer} for item, answer in zip(items, answers)]
    passed = sum(row["passed"] for row in rows)
    return {"accuracy": passed / len(rows) if rows else 0.0, "passed": passed, "total": len(rows), "items": rows}


# --- questions derived from a snapshot (no eval file) ----------------------------------------------------
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


MAX_DERIVED = 24


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


# --- held-out loss ---------------------------------------------------------------------------------------
def assistant_only_labels(tokenizer, messages: list[dict], max_len: int = 2048) -> tuple[list[int], list[int]] | None:
    """(input_ids, labels) scoring only the final assistant message and its end-of-turn token, exactly as training
    masks it; None when the conversation has no final answer to score."""
    from .train import encode_example

    return encode_example(tokenizer, messages, max_len)


def load_messages_file(path: Path) -> list[list[dict]]:
    """Conversations (messages lists ending with an assistant turn) from a snapshot's JSONL file."""
    conversations = []
    cipher = cipher_from_env()
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            messages = open_messages(orjson.loads(raw), cipher).get("messages")
        except (orjson.JSONDecodeError, AttributeError):
            raise InputError(f"{path}, line {number}: not a JSON object with 'messages'", "re-run 'cl curate'") from None
        if isinstance(messages, list) and messages and messages[-1].get("role") == "assistant":
            conversations.append(messages)
    return conversations


def held_out_loss(model, tokenizer, conversations: list[list[dict]], max_len: int = 2048) -> dict | None:
    """Token-weighted mean loss and perplexity over the final assistant messages."""
    import torch
    import torch.nn.functional as F

    total, count = 0.0, 0
    for messages in conversations:
        encoded = assistant_only_labels(tokenizer, messages, max_len)
        if encoded is None:
            continue
        ids, labels = encoded
        input_ids = torch.tensor([ids], device=model.device)
        with torch.inference_mode():
            logits = model(input_ids=input_ids).logits[0, :-1].float()
        target = torch.tensor(labels[1:], device=logits.device)
        total += float(F.cross_entropy(logits, target, ignore_index=-100, reduction="sum"))
        count += int((target != -100).sum())
    if count == 0:
        return None
    loss = total / count
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count, "examples": len(conversations)}


def answer_logliks(model, tokenizer, conversations: list[list[dict]], max_len: int = 2048) -> list[float]:
    """Mean per-token log-likelihood (nats) of each conversation's final assistant answer."""
    import torch
    import torch.nn.functional as F

    out = []
    for messages in conversations:
        encoded = assistant_only_labels(tokenizer, messages, max_len)
        if encoded is None:
            continue
        ids, labels = encoded
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([ids], device=model.device)).logits[0, :-1].float()
        target = torch.tensor(labels[1:], device=logits.device)
        out.append(-float(F.cross_entropy(logits, target, ignore_index=-100)))
    return out


def preference_answers(settings: Settings, snapshot: dict) -> dict | None:
    """{"rejected", "chosen", "source"}: conversations ending in the snapshot's held-out rejected answers and in
    their corrections / desirable answers; the trained ones when none of its rejected answers was held out (the
    training run measures the same sets)."""
    from .train import with_system_prompt

    for key, source in (("eval_file", "held_out"), ("file", "train")):
        relative = snapshot.get(key)
        path = registry.confined(settings, relative) if relative else None
        if path is None or not path.is_file():
            continue
        rejected, chosen = [], []
        for record in _snapshot_records(path):
            role, messages = preference.role_of(record), record.get("messages")
            if not isinstance(messages, list) or not messages:
                continue
            if role == preference.PAIR:
                rejected.append([*messages[:-1], {"role": "assistant", "content": preference.rejected_text(record)}])
            (rejected if role == preference.UNDESIRABLE else chosen).append(messages)
        if rejected:
            prompt = settings.chat.system_prompt
            return {"rejected": [with_system_prompt(m, prompt) for m in rejected],
                    "chosen": [with_system_prompt(m, prompt) for m in chosen], "source": source}
    return None


def _snapshot_records(path: Path) -> list[dict]:
    cipher = cipher_from_env()
    records = []
    for raw in path.read_bytes().splitlines():
        try:
            record = orjson.loads(raw)
        except orjson.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(preference.open_fields(open_messages(record, cipher), cipher))
    return records


def preference_likelihoods(model, tokenizer, answers: dict, max_len: int = 2048) -> dict:
    return {"rejected_loglik": preference.mean_loglik(answer_logliks(model, tokenizer, answers["rejected"], max_len)),
            "chosen_loglik": preference.mean_loglik(answer_logliks(model, tokenizer, answers["chosen"], max_len)),
            "preference_eval": answers["source"], "rejected_answers": len(answers["rejected"]),
            "chosen_answers": len(answers["chosen"])}


def snapshot_eval_path(settings: Settings, snapshot: dict) -> Path | None:
    """The held-out slice of a registered snapshot (its `eval_file`), if it is on disk."""
    relative = snapshot.get("eval_file")
    if not relative:
        return None
    path = registry.confined(settings, relative)
    return path if path.is_file() else None


# --- the runner ------------------------------------------------------------------------------------------
def by_length(conversations: list[list[dict]]) -> list[int]:
    """Indexes ordered by prompt length, so each batch holds prompts of similar length (little left padding)."""
    return sorted(range(len(conversations)), key=lambda i: (sum(len(m["content"]) for m in conversations[i]), i))


def common_prefix(rows: list[list[int]]) -> int:
    """Length of the token prefix every row shares, leaving each row at least one token of its own."""
    shortest = min(len(r) for r in rows) - 1
    length = 0
    while length < shortest and all(r[length] == rows[0][length] for r in rows):
        length += 1
    return length


def greedy_batch(chat, conversations: list[list[dict]], max_new_tokens: int) -> list[str]:
    """Greedy answers for one batch, as `generate` gives them, but cheaper on a CPU:
    - the prompt prefix all rows share (chat template and system prompt) is run once and its key/value cache
      copied to every row; each row's own tokens follow, padding between the two masked out and positions
      counted as if there were none;
    - only the last position's logits are computed;
    - a row that has ended (end-of-turn token) leaves the batch and the cache at once, so a batch costs what its
      live rows need, not max_new_tokens steps of every row while the longest answer finishes."""
    import torch

    tokenizer, model = chat.tokenizer, chat.model
    texts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
    rows_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    shared = common_prefix(rows_ids)
    own = [r[shared:] for r in rows_ids]
    width = max(len(r) for r in own)
    pad = tokenizer.pad_token_id
    step_ids = torch.tensor([[pad] * (width - len(r)) + r for r in own], device=model.device)
    own_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in own], device=model.device)
    positions = (shared + own_mask.cumsum(-1) - 1).masked_fill(own_mask == 0, 1)
    past = None
    with torch.inference_mode():
        if shared:
            prefix = torch.tensor([rows_ids[0][:shared]], device=model.device)
            past = model(input_ids=prefix, use_cache=True, logits_to_keep=1).past_key_values
            past.batch_repeat_interleave(len(rows_ids))
    mask = torch.cat([own_mask.new_ones(len(rows_ids), shared), own_mask], dim=-1)
    eos = torch.tensor(sorted(chat.eos_ids), device=model.device)
    rows = list(range(len(texts)))
    produced: list[list[int]] = [[] for _ in texts]
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            out = model(input_ids=step_ids, attention_mask=mask, position_ids=positions, past_key_values=past,
                        use_cache=True, logits_to_keep=1)
            past, next_ids = out.past_key_values, out.logits[:, -1].argmax(-1)
            ended = torch.isin(next_ids, eos)
            for row, token, done in zip(rows, next_ids.tolist(), ended.tolist()):
                if not done:
                    produced[row].append(token)
            live = (~ended).nonzero().squeeze(-1)
            if len(live) == 0:
                break
            if len(live) < len(rows):
                past.batch_select_indices(live)
                rows = [rows[i] for i in live.tolist()]
                next_ids, mask, positions = next_ids[live], mask[live], positions[live]
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=-1)
            positions = positions[:, -1:] + 1
            step_ids = next_ids[:, None]
    return [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in produced]


def _answer(chat, conversations: list[list[dict]], settings: Settings) -> tuple[list[str], dict]:
    size = max(1, settings.eval.batch_size)
    order = by_length(conversations)
    answers: list[str] = [""] * len(conversations)
    started = time.perf_counter()
    for start in range(0, len(order), size):
        chunk = order[start : start + size]
        batch = greedy_batch(chat, [conversations[i] for i in chunk], settings.eval.max_new_tokens)
        for i, answer in zip(chunk, batch):
            answers[i] = answer
    seconds = time.perf_counter() - started
    tokens = sum(len(chat.tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)
    return answers, {"seconds": seconds, "tokens": tokens, "prompts": len(conversations)}


def _conversations(settings: Settings, items: list[EvalItem]) -> list[list[dict]]:
    system = [{"role": "system", "content": settings.chat.system_prompt}] if settings.chat.system_prompt else []
    return [system + [{"role": "user", "content": item.prompt}] for item in items]


def _timing(parts: list[dict]) -> dict:
    seconds = sum(p["seconds"] for p in parts)
    tokens = sum(p["tokens"] for p in parts)
    prompts = sum(p["prompts"] for p in parts)
    return {
        "generation_s": round(seconds, 3),
        "latency_ms_per_prompt": round(1000 * seconds / prompts, 1) if prompts else None,
        "completion_tokens": tokens,
        "tokens_per_s": round(tokens / seconds, 2) if seconds > 0 else None,
    }


def _select(chat, settings: Settings, doc: dict, version: str | None) -> dict | None:
    """Switch the loaded model to `version` (checking its files first); returns its registry entry."""
    if version is None:
        chat.use(None)
        return None
    entry = decisions.adapter(doc, version)
    trained_on = (entry.get("base_model") or {}).get("sha256")
    if trained_on and trained_on != chat.base.sha256:
        raise RegistryError(
            f"adapter {version} was trained on another base model ({entry['base_model'].get('name')})",
            f"evaluate it with that base (--base-model), or train a new adapter on {chat.base.name}",
        )
    folder = decisions.verify_adapter_files(settings, entry)
    chat.use(version, folder)
    return entry


SCORER = 2  # bump when scoring or decoding changes: earlier results are then not reused


def result_context(settings: Settings, base_sha256: str) -> dict:
    """What an answer depends on besides the version and the questions: results agree on it to be reused."""
    return {"base_sha256": base_sha256, "system_prompt": settings.chat.system_prompt,
            "max_new_tokens": settings.eval.max_new_tokens, "scorer": SCORER}


def earlier_part(doc: dict, version: str | None, context: dict, part: str, sha256: str) -> dict | None:
    """The scored `part` ("target" or "general") of an earlier result of `version` on the same questions under the
    same context, from the registry; None when there is none. Greedy answers of the same weights do not change."""
    results = doc.get("base_evals", []) if version is None else doc["adapters"][version].get("evals", [])
    for result in reversed(results):
        if not isinstance(result, dict) or result.get("context") != context:
            continue
        if part == "target" and (result.get("eval_file") or {}).get("sha256") == sha256:
            return {k: result[k] for k in ("accuracy", "passed", "total", "items")}
        if part == "general" and (result.get("general") or {}).get("sha256") == sha256:
            return {k: result["general"][k] for k in ("accuracy", "passed", "total", "items")}
    return None


def _machine_cache(settings: Settings, context: dict, sha256: str) -> Path:
    """The base model's answers to the SHIPPED everyday set are the same in every workspace: kept once per cache."""
    key = hashlib.sha256(orjson.dumps([context, sha256])).hexdigest()[:20]
    return settings.model_cache / "evals" / f"base-general-{key}.json"


def evaluate_versions(
    settings: Settings,
    versions: list[str | None],
    eval_file: Path | str | None = None,
    include_general: bool = True,
    snapshot: str | None = None,
    chat=None,
    progress: Progress | None = None,
    known_losses: Mapping[str | None, float] | None = None,
    known_preference: Mapping[str | None, dict] | None = None,
) -> list[dict]:
    """Evaluate each version (None or "base" = the base model alone) on the same prompts, loading the base once.

    `snapshot`: a registered snapshot whose held-out slice gives each version's eval loss (and, without a keyword
    file, the questions). `known_losses`: held-out losses already measured (by the training run) on that slice.
    Parts already scored for a version under the same context are reused, not generated again.
    `known_preference`: the rejected / chosen answers' log-likelihoods the training run measured, likewise."""
    from .chat.models import ChatModel

    say = progress or (lambda _msg: None)
    versions = [None if v in (None, BASE) else v for v in versions]
    doc = registry.load(settings)
    target = target_set(settings, doc, eval_file, snapshot)
    general = load_eval_file(general_file(settings)) if include_general else []
    held_out = _held_out(settings, doc, snapshot)
    answers = preference_answers(settings, registry.find_snapshot(doc, snapshot)) if snapshot else None
    if chat is None:
        say(f"loading base model {settings.model.base_model}")
        chat = ChatModel.load(settings)
    # one short generation first, so the first version's timings do not include one-off warm-up costs
    chat.generate_batch(_conversations(settings, target.items[:1]), max_new_tokens=2, batch_size=1)
    context = {
        "eval_file": target.info,
        "general_file": file_info(settings, general_file(settings)) if include_general else None,
        "snapshot": snapshot if held_out is not None else None,
        "base_model": {"name": chat.base.name, "sha256": chat.base.sha256},
        "context": result_context(settings, chat.base.sha256),
        "shipped_general": general_file(settings) == GENERAL_FILE,
    }
    say(f"target questions: {target.info['name']}")
    results = []
    for version in versions:
        loss = (known_losses or {}).get(version)
        result = _evaluate_one(settings, chat, doc, version, target.items, general, held_out, context, loss, say)
        if answers is not None:
            known = (known_preference or {}).get(version)
            result.update(known if known is not None else
                          preference_likelihoods(chat.model, chat.tokenizer, answers, chat.context_limit))
            say(f"{label(version)}: rejected answers' mean log-likelihood {result['rejected_loglik']:.3f}, "
                f"corrections / desirable {_fmt(result['chosen_loglik'])}")
        results.append(result)
    return results


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _held_out(settings: Settings, doc: dict, snapshot: str | None) -> list[list[dict]] | None:
    if snapshot is None:
        return None
    path = snapshot_eval_path(settings, registry.find_snapshot(doc, snapshot))
    if path is None:
        raise InputError(f"snapshot {snapshot} has no held-out eval file on disk", "re-run 'cl curate' or drop --snapshot")
    from .train import with_system_prompt

    return [with_system_prompt(m, settings.chat.system_prompt) for m in load_messages_file(path)] or None


def _scored_part(settings, chat, doc, version, items, part, sha256, context, parts) -> dict:
    """Score `items` for the selected version, reusing an earlier identical run when there is one."""
    earlier = earlier_part(doc, version, context["context"], part, sha256)
    cache = _machine_cache(settings, context["context"], sha256)
    use_machine_cache = version is None and part == "general" and context["shipped_general"]
    if earlier is None and use_machine_cache and cache.is_file():
        earlier = read_json(cache, default=None)
    if earlier is not None:
        return {**earlier, "reused": True}
    answers, timing = _answer(chat, _conversations(settings, items), settings)
    parts.append(timing)
    scored = score_items(items, answers)
    if use_machine_cache:
        atomic_write_json(cache, scored)
    return scored


def _evaluate_one(settings, chat, doc, version, items, general, held_out, context, known_loss, say) -> dict:
    entry = _select(chat, settings, doc, version)
    parts: list[dict] = []
    target_sha, general_sha = context["eval_file"]["sha256"], (context["general_file"] or {}).get("sha256")
    scored = _scored_part(settings, chat, doc, version, items, "target", target_sha, context, parts)
    general_scored = (_scored_part(settings, chat, doc, version, general, "general", general_sha, context, parts)
                      if general else None)
    reused = [name for name, p in (("target", scored), ("everyday", general_scored)) if p and p.get("reused")]
    say(f"evaluated {label(version)}: {scored['passed']}/{scored['total']} target"
        + (f", {general_scored['passed']}/{general_scored['total']} everyday" if general_scored else "")
        + (f" (reused earlier answers: {', '.join(reused)})" if reused else ""))
    loss = None
    if held_out and known_loss is not None:
        loss = {"eval_loss": known_loss, "perplexity": math.exp(min(known_loss, 50.0))}
    elif held_out:
        loss = held_out_loss(chat.model, chat.tokenizer, held_out, chat.context_limit)
    return {
        "version": version,
        "label": label(version),
        "status": entry["status"] if entry else None,
        "created_at": utc_now(),
        **{k: scored[k] for k in ("accuracy", "passed", "total", "items")},
        "eval_file": context["eval_file"],
        "general_accuracy": general_scored["accuracy"] if general_scored else None,
        "general": ({**context["general_file"], **{k: general_scored[k] for k in ("accuracy", "passed", "total", "items")}}
                    if general_scored else None),
        "eval_loss": loss["eval_loss"] if loss else None,
        "perplexity": loss["perplexity"] if loss else None,
        "snapshot": context["snapshot"] if loss else None,
        **_timing(parts or [{"seconds": 0.0, "tokens": 0, "prompts": 0}]),
        "reused": reused,
        "max_new_tokens": settings.eval.max_new_tokens,
        "base_model": context["base_model"],
        "context": context["context"],
    }


# --- evaluate, gate, promote -----------------------------------------------------------------------------
def plan(doc: dict, version: str | None = None, against: str | None = None) -> dict:
    """Which version to evaluate, against which, and whether the gate may promote.

    Defaults: the newest candidate (else the champion, else the base) against the champion (else the base)."""
    if version in (None, ""):
        subject = decisions.newest_candidate(doc) or doc["champion"]
    else:
        subject = None if version == BASE else version
    if subject is not None:
        decisions.adapter(doc, subject)
    if against is None:
        other, compare = (doc["champion"] if doc["champion"] != subject else None), subject is not None
    elif against == "none":
        other, compare = None, False
    else:
        other = doc["champion"] if against == "champion" else (None if against == BASE else against)
        compare = True
        if other is not None:
            decisions.adapter(doc, other)
    if compare and other == subject:
        raise InputError(f"cannot evaluate {label(subject)} against itself", "pick another with --against")
    gated = compare and subject is not None and doc["adapters"][subject]["status"] == "candidate" and other == doc["champion"]
    return {"subject": subject, "against": other, "compare": compare, "gated": gated}


def evaluate_and_gate(
    settings: Settings,
    candidate: str | None = None,
    eval_file: Path | str | None = None,
    promote: bool = True,
    against: str | None = None,
    snapshot: str | None = None,
    include_general: bool = True,
    chat=None,
    progress: Progress | None = None,
) -> dict:
    """Evaluate `candidate` (default: the newest) against the champion or base, store both results, run the
    gate and promote when it says so (unless `promote=False`). Returns a JSON-ready report."""
    doc = registry.load(settings)
    steps = plan(doc, candidate, against)
    if snapshot is None and steps["subject"] is not None:
        snapshot = _own_snapshot(settings, doc, steps["subject"])
    versions = [steps["subject"]] + ([steps["against"]] if steps["compare"] else [])
    known = _training_losses(doc, steps, snapshot)
    known_preference = _training_preference(doc, steps, snapshot)
    results = evaluate_versions(settings, versions, eval_file, include_general, snapshot, chat, progress, known,
                                known_preference)
    for result in results:
        decisions.record_eval_result(settings, result["version"], result)
    report = {"subject": results[0], "against": results[1] if steps["compare"] else None, "decision": None, "promoted": False}
    if steps["gated"]:
        decision = gate(results[0], results[1], gate_rules(settings))
        report["decision"] = decision.to_dict()
        if decision.promote and promote:
            decisions.promote_version(settings, steps["subject"], "gate: " + decision.summary,
                                      expected_champion=steps["against"])
            report["promoted"] = True
    report["champion"] = registry.load(settings)["champion"]
    return report


def gate_rules(settings: Settings) -> decisions.GateRules:
    cfg = settings.eval
    return decisions.GateRules(gain_alpha=cfg.gain_alpha, general_margin=cfg.general_tolerance,
                               general_alpha=cfg.alpha, min_questions=cfg.min_questions, loss_margin=cfg.loss_margin)


def _training_losses(doc: dict, steps: dict, snapshot: str | None) -> dict:
    """Held-out losses the candidate's training run measured on its own snapshot: the trained adapter's, and the
    model it started from (the champion it warm-started from, or the base). Both came from the same 4-bit model,
    so they compare with each other (and are not measured again)."""
    subject = steps["subject"]
    if subject is None or snapshot is None:
        return {}
    entry = doc["adapters"][subject]
    metrics = entry.get("metrics") or {}
    if (entry.get("snapshot") or {}).get("id") != snapshot or metrics.get("eval_loss") is None:
        return {}
    known = {subject: metrics["eval_loss"]}
    started_from = (entry.get("warm_start") or {}).get("from")
    if steps["compare"] and steps["against"] == started_from and metrics.get("eval_loss_start") is not None:
        known[started_from] = metrics["eval_loss_start"]
    needed = {subject, steps["against"]} if steps["compare"] else {subject}
    return known if needed <= known.keys() else {}  # never compare a 4-bit training loss with an eval-time one


def _training_preference(doc: dict, steps: dict, snapshot: str | None) -> dict:
    """The rejected / chosen answers' log-likelihoods the candidate's training run measured (after training, and
    before it for the model it started from), under the same rule as `_training_losses`: both or neither."""
    subject = steps["subject"]
    if subject is None or snapshot is None:
        return {}
    entry = doc["adapters"][subject]
    metrics = entry.get("metrics") or {}
    if (entry.get("snapshot") or {}).get("id") != snapshot or metrics.get("rejected_loglik") is None:
        return {}
    shared = {k: metrics.get(k) for k in ("preference_eval", "rejected_answers", "chosen_answers")}
    known = {subject: {"rejected_loglik": metrics["rejected_loglik"], "chosen_loglik": metrics.get("chosen_loglik"),
                       **shared}}
    started_from = (entry.get("warm_start") or {}).get("from")
    if steps["compare"] and steps["against"] == started_from and metrics.get("rejected_loglik_start") is not None:
        known[started_from] = {"rejected_loglik": metrics["rejected_loglik_start"],
                               "chosen_loglik": metrics.get("chosen_loglik_start"), **shared}
    needed = {subject, steps["against"]} if steps["compare"] else {subject}
    return known if needed <= known.keys() else {}


def _own_snapshot(settings: Settings, doc: dict, version: str) -> str | None:
    """The snapshot an adapter was trained on, when its held-out slice is still on disk."""
    snapshot_id = (doc["adapters"][version].get("snapshot") or {}).get("id")
    if not snapshot_id:
        return None
    try:
        snap = registry.find_snapshot(doc, snapshot_id)
    except RegistryError:
        return None
    return snapshot_id if snapshot_eval_path(settings, snap) else None
