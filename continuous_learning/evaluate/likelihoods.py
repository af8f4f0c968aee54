"""Preference log-likelihoods: how likely a model finds the answers users rejected, and their corrections or
desirable answers, so the gate can refuse a candidate that made rejected answers come back."""
from __future__ import annotations

from pathlib import Path

import orjson

from .. import registry
from ..core.settings import Settings
from ..storage.crypto import cipher_from_env, open_messages
from ..train import preference
from .heldout import answer_logliks


def preference_answers(settings: Settings, snapshot: dict) -> dict | None:
    """{"rejected", "chosen", "source"}: conversations ending in the snapshot's held-out rejected answers and in
    their corrections / desirable answers; the trained ones when none of its rejected answers was held out (the
    training run measures the same sets)."""
    from ..train import with_system_prompt

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
