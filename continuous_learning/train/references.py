"""What the frozen base says, measured with the adapter disabled (the same 4-bit or full-precision base the adapter
trains on, no second model in memory): its top-k next-token distributions on the rehearsal answers (the KL
targets, cached per base model; or, with `train.kl_reference = "parent"`, those of the adapter a warm-started run
starts from) and its summed log-prob of every answer a preference term scores."""
from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import orjson

from ..core.errors import TrainingFailed
from ..core.settings import SHIPPED_DATA
from ..storage.store import ensure_dir
from .collate import collate_padded, loss_positions
from .data import RunData
from .encode import IGNORE_INDEX
from .losses import Forward, forward_losses

REFERENCE_TOP_K = 64  # the base's next-token distribution kept per rehearsal position (the rest is one bucket)


def reference_cache(model_cache: Path, base_sha256: str, load_in_4bit: bool, anchors: list[dict]) -> Path:
    """Where the base's distributions on these rehearsal answers are kept, so later runs do not compute them again."""
    key = hashlib.sha256(orjson.dumps([base_sha256, load_in_4bit, REFERENCE_TOP_K,
                                       [a["input_ids"] for a in anchors]])).hexdigest()[:20]
    return model_cache / f"rehearsal-reference-{key}.pt"


def cached_reference(cache: Path) -> dict | None:
    """The base's distributions measured by an earlier run, if any."""
    import torch

    return torch.load(cache, weights_only=True) if cache.is_file() else None


def save_reference(cache: Path, reference: dict) -> None:
    import torch

    ensure_dir(cache.parent)
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}.cl-tmp")
    torch.save(reference, tmp)
    os.replace(tmp, cache)


def attach_reference(anchors: list[dict], reference: dict) -> None:
    """Give each rehearsal example the frozen base's top-k next-token distributions on its answer."""
    for anchor, (ids, logp) in zip(anchors, zip(reference["ids"], reference["logp"])):
        anchor["ref_ids"], anchor["ref_logp"] = ids.long(), logp


def measure_reference(forward: Forward, model, anchors: list[dict], pad_id: int, with_adapter: bool = False) -> dict:
    """The top-k next-token distributions on the anchors' answers: the frozen base's, or with `with_adapter` the
    adapter the run starts from (its dropout off, so the targets are what that adapter says)."""
    import torch

    ids_out, logp_out = [], []
    context = adapter_without_dropout(model) if with_adapter else model.disable_adapter()
    with torch.no_grad(), context:  # train mode: keeps bitsandbytes' training layout
        for start in range(0, len(anchors), 8):
            chunk = anchors[start : start + 8]
            batch = collate_padded([{**a, "weight": 1.0} for a in chunk], pad_id, forward.device)
            needed = loss_positions(batch.labels)
            logp = torch.log_softmax(forward.logits(model, batch.ids, batch.mask, needed), dim=-1)
            for row, anchor in enumerate(chunk):
                columns = torch.tensor([j - 1 for j, t in enumerate(anchor["labels"]) if t != IGNORE_INDEX])
                top = logp[row, torch.searchsorted(needed, columns)].topk(REFERENCE_TOP_K, dim=-1)
                ids_out.append(top.indices.to(torch.int32).cpu())
                logp_out.append(top.values.to(torch.float16).cpu())
    return {"ids": ids_out, "logp": logp_out}


@contextmanager
def adapter_without_dropout(model) -> Iterator[None]:
    """The model as it would answer (LoRA dropout off) while staying in train mode otherwise."""
    dropouts = [m for name, m in model.named_modules() if name.endswith("lora_dropout")]  # eval() reaches its children
    for module in dropouts:
        module.eval()
    try:
        yield
    finally:
        for module in dropouts:
            module.train()


def preference_items(examples: list[dict], undesirable: list[dict]) -> list[dict]:
    """Every answer a preference term scores: the marked examples, the pairs' rejected answers, the "no" answers."""
    items = [e for e in examples if "pref_term" in e]
    return items + [e["rejected_item"] for e in examples if "rejected_item" in e] + undesirable


def attach_preference_reference(forward: Forward, model, items: list[dict], pad_id: int) -> None:
    """The frozen base's summed log-prob of each of `items` (and its labelled token count), measured once per run."""
    import torch

    with torch.no_grad(), model.disable_adapter():  # train mode: keeps bitsandbytes' training layout
        for start in range(0, len(items), 8):
            chunk = items[start : start + 8]
            batch = collate_padded([{**e, "weight": 1.0} for e in chunk], pad_id, forward.device)
            losses, _, _, _, _ = forward_losses(forward, model, batch.ids, batch.mask, batch.labels)
            for row, item in enumerate(chunk):
                item["ref_logp"] = -float(losses[row].sum())
                item["tokens"] = sum(1 for j, t in enumerate(item["labels"]) if t != IGNORE_INDEX and j > 0)


def measure_base(forward: Forward, model, data: RunData, model_cache: Path, base_sha256: str, load_in_4bit: bool,
                 pad_id: int, write_cache: bool, status: Callable[[str], None],
                 parent: KLParent | None = None) -> dict[str, float]:
    """Attach the KL targets to the rehearsal answers and the frozen base's log-probs to the preference answers;
    returns the seconds of what had to be measured (`kl_reference_s`, `preference_reference_s`). The KL targets are
    the frozen base's, or with `parent` those of the adapter a warm-started run starts from (both cached; written
    when `write_cache`: rank 0)."""
    timings = {}
    if data.anchors:
        started = time.perf_counter()
        if _attach_kl_targets(forward, model, data.anchors, model_cache, base_sha256, load_in_4bit, pad_id,
                              write_cache, status, parent):
            timings["kl_reference_s"] = time.perf_counter() - started
    items = preference_items(data.examples, data.undesirable)
    if items:
        status(f"measuring the base model on {len(items)} preference answer(s) (once)")
        started = time.perf_counter()
        attach_preference_reference(forward, model, items, pad_id)
        timings["preference_reference_s"] = time.perf_counter() - started
    return timings


@dataclasses.dataclass(frozen=True)
class KLParent:
    """The adapter a warm-started run starts from, as the KL term's reference (`train.kl_reference = "parent"`):
    the run is held to what its parent says on everyday prompts rather than to the base, which knows nothing of
    earlier rounds (on the bundled model this kept no more of them: README). `loaded` says the model holds the
    parent now (False: resumed from a checkpoint, so only the cache can give its targets)."""

    version: str
    sha256: str
    loaded: bool


def _attach_kl_targets(forward: Forward, model, anchors: list[dict], model_cache: Path, base_sha256: str,
                       load_in_4bit: bool, pad_id: int, write_cache: bool, status: Callable[[str], None],
                       parent: KLParent | None) -> bool:
    """Attach the KL targets from the machine cache, the package (the bundled model's), or measured now: True when
    they had to be measured."""
    whose = base_sha256 if parent is None else f"{base_sha256}:{parent.sha256}"
    cache = reference_cache(model_cache, whose, load_in_4bit, anchors)
    reference = cached_reference(cache)
    if reference is None and parent is None:
        reference = cached_reference(SHIPPED_DATA / cache.name)  # the bundled model's
    if reference is None and parent is not None and not parent.loaded:
        raise TrainingFailed(f"the KL targets of adapter {parent.version} are no longer cached, and this resumed "
                             "run no longer holds that adapter", "start the run again without --resume")
    measured = reference is None
    if reference is None:
        who = "the base model" if parent is None else f"adapter {parent.version}"
        status(f"measuring {who} on {len(anchors)} rehearsal prompts (once)")
        reference = measure_reference(forward, model, anchors, pad_id, with_adapter=parent is not None)
        if write_cache:
            save_reference(cache, reference)
    attach_reference(anchors, reference)
    return measured
