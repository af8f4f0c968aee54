"""Evaluating adapter versions on the same prompts: the base model is loaded once, each version selected in turn
(its files checked first), its answers scored, and parts already scored under the same context reused."""
from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping
from pathlib import Path

import orjson

from .. import registry
from ..core.errors import InputError, RegistryError
from ..core.records import utc_now
from ..core.settings import SHIPPED_DATA, Settings
from ..registry import BASE, label
from ..storage.store import atomic_write_json, read_json
from .generation import answer_in_batches, question_conversations, target_system_prompts, timing_summary
from .heldout import held_out_loss
from .likelihoods import preference_answers, preference_likelihoods
from .questions import GENERAL_FILE, file_info, general_file, load_eval_file, target_set
from .scoring import score_items, score_under_prompts
from .snapshots import load_messages_file, snapshot_eval_path

Progress = Callable[[str], None]
SCORED_KEYS = ("accuracy", "passed", "total", "items")  # what a scored part holds
PROMPT_KEYS = ("score", "system_prompts")  # and a target part asked under several system prompts
SCORER = 3  # bump when scoring or decoding changes: earlier results are then not reused


def result_context(settings: Settings, base_sha256: str) -> dict:
    """What an answer depends on besides the version and the questions: results agree on it to be reused."""
    return {"base_sha256": base_sha256, "system_prompt": settings.chat.system_prompt,
            "target_system_prompts": target_system_prompts(settings),
            "max_new_tokens": settings.eval.max_new_tokens, "scorer": SCORER}


def _part(scored: dict) -> dict:
    return {k: scored[k] for k in SCORED_KEYS + PROMPT_KEYS if k in scored}


def earlier_part(doc: dict, version: str | None, context: dict, part: str, sha256: str) -> dict | None:
    """The scored `part` ("target" or "general") of an earlier result of `version` on the same questions under the
    same context, from the registry; None when there is none. Greedy answers of the same weights do not change."""
    results = doc.get("base_evals", []) if version is None else list(registry.registered_adapter(doc, version).evals)
    for result in reversed(results):
        if not isinstance(result, dict) or result.get("context") != context:
            continue
        if part == "target" and (result.get("eval_file") or {}).get("sha256") == sha256:
            return _part(result)
        if part == "general" and (result.get("general") or {}).get("sha256") == sha256:
            return _part(result["general"])
    return None


def machine_cache(settings: Settings, context: dict, sha256: str, device: str) -> Path:
    """The base model's answers to the SHIPPED everyday set are the same in every workspace: kept once per cache.
    The device is part of the key (bfloat16 on a GPU, float32 on the CPU: greedy answers can differ between them)."""
    key = hashlib.sha256(orjson.dumps([context, sha256, device])).hexdigest()[:20]
    return settings.model_cache / "evals" / f"base-general-{key}.json"


def shipped_answers(cache: Path) -> Path:
    """Where the package keeps the bundled model's answers for a machine-cache file, generated the same way on the
    defaults, so a new user's first evaluation does not answer 98 everyday questions with the base first."""
    return SHIPPED_DATA / cache.name


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
    wants_general: Callable[[list[dict]], bool] | None = None,
) -> list[dict]:
    """Evaluate each version (None or "base" = the base model alone) on the same prompts, loading the base once.

    `snapshot`: a registered snapshot whose held-out slice gives each version's eval loss (and, without a keyword
    file, the questions). `known_losses`: held-out losses already measured (by the training run) on that slice.
    Parts already scored for a version under the same context are reused, not generated again.
    `known_preference`: the rejected / chosen answers' log-likelihoods the training run measured, likewise.
    `wants_general`: asked with the results so far (target questions, losses) whether the everyday questions can
    still matter; when it says no, they are not asked and each result says so (`general_skipped`)."""
    from ..chat.models import ChatModel

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
    chat.generate_batch(question_conversations(settings, target.items[:1]), max_new_tokens=2, batch_size=1)
    context = _eval_context(settings, chat, target.info, snapshot if held_out is not None else None, include_general)
    say(f"target questions: {target.info['name']}")
    results, parts = [], []
    for version in versions:
        loss = (known_losses or {}).get(version)
        result, timing = _evaluate_target(settings, chat, doc, version, target.items, held_out, context, loss)
        if answers is not None:
            known = (known_preference or {}).get(version)
            result.update(known if known is not None else
                          preference_likelihoods(chat.model, chat.tokenizer, answers, chat.context_limit))
            say(f"{label(version)}: rejected answers' mean log-likelihood {result['rejected_loglik']:.3f}, "
                f"corrections / desirable {_fmt(result['chosen_loglik'])}")
        results.append(result)
        parts.append(timing)
    ask_general = bool(general) and (wants_general is None or wants_general(results))
    for version, result, timing in zip(versions, results, parts):
        if ask_general:
            _select(chat, settings, doc, version)
            scored = _scored_part(settings, chat, doc, version, general, "general", context["general_file"]["sha256"],
                                  context, timing)
            result.update(general_accuracy=scored["accuracy"], general={**context["general_file"], **_part(scored)})
            result["reused"] += ["everyday"] if scored.get("reused") else []
        elif general:
            result["general_skipped"] = "the gate refuses the candidate without them"
        result.update(timing_summary(timing or [{"seconds": 0.0, "tokens": 0, "prompts": 0}]))
        say(_evaluated_line(result))
    return results


def _eval_context(settings: Settings, chat, target_info: dict, snapshot: str | None, include_general: bool) -> dict:
    """What every version's result shares: the question files, the snapshot, the base, the answer context."""
    return {
        "eval_file": target_info,
        "general_file": file_info(settings, general_file(settings)) if include_general else None,
        "snapshot": snapshot,
        "base_model": {"name": chat.base.name, "sha256": chat.base.sha256},
        "context": result_context(settings, chat.base.sha256),
        "shipped_general": general_file(settings) == GENERAL_FILE,
    }


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _held_out(settings: Settings, doc: dict, snapshot: str | None) -> list[list[dict]] | None:
    if snapshot is None:
        return None
    path = snapshot_eval_path(settings, registry.find_snapshot(doc, snapshot))
    if path is None:
        raise InputError(f"snapshot {snapshot} has no held-out eval file on disk",
                         "re-run 'cl curate' or drop --snapshot")
    from ..train import with_system_prompt

    return [with_system_prompt(m, settings.chat.system_prompt) for m in load_messages_file(path)] or None


def _scored_part(settings, chat, doc, version, items, part, sha256, context, parts) -> dict:
    """Score `items` for the selected version, reusing an earlier identical run when there is one."""
    earlier = earlier_part(doc, version, context["context"], part, sha256)
    cache = machine_cache(settings, context["context"], sha256, chat.model.device.type)
    use_machine_cache = version is None and part == "general" and context["shipped_general"]
    if earlier is None and use_machine_cache:
        earlier = _cached_base_general(cache)
    if earlier is not None:
        return {**earlier, "reused": True}
    scored = _answer_and_score(settings, chat, items, part, parts)
    if use_machine_cache:
        atomic_write_json(cache, scored)
    return scored


def _cached_base_general(cache: Path) -> dict | None:
    """The base's scored everyday answers from this machine's cache, else from the package."""
    for known in (cache, shipped_answers(cache)):
        found = read_json(known, default=None) if known.is_file() else None
        if found is not None:
            return found
    return None


def _answer_and_score(settings, chat, items, part, parts) -> dict:
    """The target questions under each of `target_system_prompts`, the everyday ones under the chat's prompt. All
    of a part's conversations are generated together: a batch step costs about the same for 6 rows as for 18."""
    prompts = target_system_prompts(settings) if part == "target" else [True]
    conversations = [c for prompt in prompts for c in question_conversations(settings, items, prompt)]
    flat, timing = answer_in_batches(chat, conversations, settings)
    parts.append(timing)
    answers = [flat[k * len(items) : (k + 1) * len(items)] for k in range(len(prompts))]
    return score_under_prompts(items, answers, prompts) if part == "target" else score_items(items, answers[0])


def _evaluate_target(settings, chat, doc, version, items, held_out, context, known_loss) -> tuple[dict, list]:
    """One version's result on the target questions and the held-out loss (no everyday part yet), and the timing
    of each generation it ran."""
    entry = _select(chat, settings, doc, version)
    parts: list[dict] = []
    scored = _scored_part(settings, chat, doc, version, items, "target", context["eval_file"]["sha256"], context,
                          parts)
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
        **_part(scored),
        "eval_file": context["eval_file"],
        "general_accuracy": None,
        "general": None,
        "eval_loss": loss["eval_loss"] if loss else None,
        "perplexity": loss["perplexity"] if loss else None,
        "snapshot": context["snapshot"] if loss else None,
        "reused": ["target"] if scored.get("reused") else [],
        "max_new_tokens": settings.eval.max_new_tokens,
        "base_model": context["base_model"],
        "context": context["context"],
    }, parts


def _evaluated_line(result: dict) -> str:
    general = result["general"]
    line = f"evaluated {result['label']}: {result['passed']}/{result['total']} target"
    if general:
        line += f", {general['passed']}/{general['total']} everyday"
    if result.get("general_skipped"):
        line += f" (everyday questions not asked: {result['general_skipped']})"
    return line + (f" (reused earlier answers: {', '.join(result['reused'])})" if result["reused"] else "")


def _select(chat, settings: Settings, doc: dict, version: str | None) -> dict | None:
    """Switch the loaded model to `version` (checking its files first); returns its registry entry."""
    if version is None:
        chat.use(None)
        return None
    entry = registry.adapter(doc, version)
    trained_on = (entry.get("base_model") or {}).get("sha256")
    if trained_on and trained_on != chat.base.sha256:
        raise RegistryError(
            f"adapter {version} was trained on another base model ({entry['base_model'].get('name')})",
            f"evaluate it with that base (--base-model), or train a new adapter on {chat.base.name}",
        )
    folder = registry.verify_adapter_files(settings, entry)
    chat.use(version, folder)
    return entry
