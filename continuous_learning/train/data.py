"""What a run trains on: the snapshot (checked against its registered sha256), its records tokenized under the
system prompts, split into SFT examples and "no" answers with the preference term each one feeds, the rehearsal
prompts, the held-out examples and the answers whose likelihood the run reports."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from .. import registry
from ..chat.models import BaseModel, file_sha256
from ..core.errors import InputError, NothingToDo
from ..core.settings import Settings, TrainConfig
from . import preference
from .encode import load_examples, system_prompts, tokenize_examples
from .rehearsal import rehearsal_records

Report = Callable[[str], None]


def resolve_snapshot(doc: dict, snapshot_id: str | None) -> dict:
    """The snapshot named, else the newest one."""
    if snapshot_id:
        return registry.find_snapshot(doc, snapshot_id)
    snapshot = registry.latest_snapshot(doc)
    if snapshot is None:
        raise NothingToDo("there is no curated snapshot to train on", "run 'cl curate' first")
    return snapshot


def snapshot_file(settings: Settings, snapshot: dict) -> tuple[Path, str]:
    """The snapshot's training file and its sha256, refused when missing or changed since it was registered."""
    relative = snapshot.get("file")
    if not relative:
        raise InputError(f"snapshot {snapshot['id']} names no file", "curate again with 'cl curate'")
    path = registry.confined(settings, relative)
    if not path.exists():
        raise InputError(f"snapshot file {relative} is missing", "curate again with 'cl curate'")
    digest = file_sha256(path)
    expected = snapshot.get("sha256")
    if expected and expected != digest:
        raise InputError(
            f"snapshot file {relative} changed since it was registered (sha256 mismatch)",
            "curate a new snapshot with 'cl curate'",
        )
    return path, digest


def snapshot_eval_file(settings: Settings, snapshot: dict) -> Path | None:
    relative = snapshot.get("eval_file")
    return registry.confined(settings, relative) if relative else None


@dataclasses.dataclass
class RunData:
    """The tokenized material of one run (examples may be there under several system prompts)."""

    examples: list[dict]
    undesirable: list[dict]  # answers rated unhelpful (and, with objective kto, corrections' rejected)
    objective: dict
    records: int = 0  # distinct snapshot records behind `examples`
    undesirable_records: int = 0
    anchors: list[dict] = dataclasses.field(default_factory=list)  # rehearsal (kl): the base model's own answers
    eval_examples: list[dict] = dataclasses.field(default_factory=list)
    preference_eval: dict = dataclasses.field(default_factory=dict)  # {"rejected", "chosen", "source"}
    lengths: list[int] = dataclasses.field(default_factory=list)  # of `examples`, for length grouping

    @property
    def pushes_down(self) -> bool:
        """Whether a step pushes "no" answers down (KTO or DPO): then it holds more everyday prompts to the base."""
        return bool(self.undesirable) or self.objective["dpo"]


def assign_preference_terms(tokenized: list[dict], setting: str) -> RunData:
    """Split the snapshot's examples into SFT examples and undesirable ones, and mark what each preference term
    (from train.objective and the data) scores: KTO on desirable and undesirable answers, DPO on pairs."""
    from .preference import DPO_CHOSEN, DPO_REJECTED, KTO_DESIRABLE, KTO_UNDESIRABLE, UNDESIRABLE

    undesirable = [e for e in tokenized if e["role"] == UNDESIRABLE]
    examples = [e for e in tokenized if e["role"] != UNDESIRABLE]
    pairs = len({e["record"] for e in examples if "rejected" in e})
    unpaired = len({e["record"] for e in undesirable})
    objective = preference.resolve_objective(setting, unpaired, pairs)
    for example in examples:
        rejected = example.pop("rejected", None)
        if rejected is not None and objective["dpo"]:
            example["pref_term"] = DPO_CHOSEN
            example["rejected_item"] = {**rejected, "id": example["id"], "record": example["record"],
                                        "weight": 0.0, "pref_term": DPO_REJECTED}
        elif objective["kto"]:
            example["pref_term"] = KTO_DESIRABLE
            if rejected is not None and objective["pairs_as_kto"]:
                undesirable.append({**rejected, "id": example["id"], "record": example["record"],
                                    "weight": 1.0, "role": UNDESIRABLE})
    for item in undesirable:  # their SFT weight becomes the weight of their KTO term: they are never imitated
        item.update(pref_term=KTO_UNDESIRABLE, pref_weight=item["weight"], weight=0.0)
    return RunData(examples, undesirable if objective["kto"] else [], objective)


def _answer_sets(examples: list[dict]) -> tuple[list[dict], list[dict]]:
    rejected = [e for e in examples if e["role"] == preference.UNDESIRABLE]
    rejected += [e["rejected"] for e in examples if "rejected" in e]
    return rejected, [e for e in examples if e["role"] != preference.UNDESIRABLE]


def preference_eval_sets(tokenizer, held_out: list[dict], records: list[dict], max_seq_len: int,
                         system_prompt: str | None) -> dict:
    """The rejected and the chosen/desirable answers whose mean per-token log-likelihood the run reports: the
    held-out ones, or (when none of the snapshot's rejected answers was held out) the trained ones."""
    rejected, chosen = _answer_sets(held_out)
    source = "held_out"
    if not rejected:
        snapshot_records = [r for r in records if r.get("kind") != "rehearsal"]  # what evaluate reads too
        trained, _ = tokenize_examples(tokenizer, snapshot_records, max_seq_len, system_prompt)
        rejected, chosen = _answer_sets(trained)
        source = "train"
    return {"rejected": rejected, "chosen": chosen, "source": source} if rejected else {}


def _rehearsal(settings: Settings, base: BaseModel, status: Report) -> list[dict]:
    if settings.train.rehearsal_examples > 0:
        status("preparing rehearsal examples (the base model's own everyday answers)")
    return rehearsal_records(settings, base)


def prepare_data(settings: Settings, base: BaseModel, tokenizer, snapshot: dict, train_path: Path,
                 status: Report, warn: Report) -> RunData:
    """Everything the run trains and measures on, tokenized; refuses a snapshot with nothing to learn."""
    cfg: TrainConfig = settings.train
    records, unreadable = load_examples(train_path)
    if cfg.rehearsal == "sft":
        records += _rehearsal(settings, base, status)
    prompts = system_prompts(settings.chat.system_prompt, cfg.vary_system_prompt)
    tokenized, skipped = tokenize_examples(tokenizer, records, cfg.max_seq_len, prompts)
    data = assign_preference_terms(tokenized, cfg.objective)
    if data.objective["ignored"]:
        warn(f"train.objective={cfg.objective}: {data.objective['ignored']} answer(s) rated unhelpful "
             "or corrected are not learned from as 'no' (train.objective=auto uses them)")
    data.records = len({e["record"] for e in data.examples})
    data.lengths = [len(e["input_ids"]) for e in data.examples]
    data.undesirable_records = len({e["record"] for e in data.undesirable})
    if cfg.rehearsal == "kl":
        data.anchors, _ = tokenize_examples(tokenizer, _rehearsal(settings, base, status), cfg.max_seq_len,
                                            prompts[:2])
    if unreadable or skipped:
        warn(f"skipped {unreadable + skipped} unusable line(s) of snapshot {snapshot['id']}")
    if not data.examples and not data.undesirable:
        raise InputError(
            f"snapshot {snapshot['id']} has no trainable example (each needs a user turn and a final "
            f"assistant answer; with train.objective={cfg.objective}, answers rated unhelpful teach nothing)",
            "curate again with 'cl curate', pick another with --snapshot, or use train.objective=auto",
        )
    eval_path = snapshot_eval_file(settings, snapshot)
    eval_records = load_examples(eval_path)[0] if eval_path is not None and eval_path.exists() else []
    held_out, _ = tokenize_examples(tokenizer, eval_records, cfg.max_seq_len, settings.chat.system_prompt)
    data.eval_examples = [e for e in held_out if e["role"] != preference.UNDESIRABLE]
    data.preference_eval = preference_eval_sets(tokenizer, held_out, records, cfg.max_seq_len,
                                                settings.chat.system_prompt)
    return data
