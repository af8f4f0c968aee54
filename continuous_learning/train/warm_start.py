"""Which adapter a run starts from: the champion when it was trained on the same base with the same LoRA shape
(its files checked against their registered sha256), else a fresh adapter, with the reason recorded."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from .. import registry
from ..chat.models import file_sha256
from ..core.errors import TrainingFailed
from ..core.settings import Settings, TrainConfig, target_modules
from ..storage.store import read_json


@dataclasses.dataclass(frozen=True)
class WarmStart:
    """The parent version and its folder (None for a fresh adapter), what the lineage records, and the warning
    to show when a champion was passed over."""

    parent: str | None
    folder: Path | None
    record: dict
    warning: str | None = None


def verified_adapter_dir(settings: Settings, doc: dict, version: str) -> Path:
    """The folder of registered adapter `version`, refused when a file no longer matches its sha256."""
    entry = registry.adapter_view(doc, version)
    if entry is None:
        raise TrainingFailed(f"the parent adapter {version} of this run is no longer registered",
                             "start over with 'cl train --fresh'")
    folder = registry.confined(settings, entry.path)
    for name, digest in entry.sha256.items():
        path = folder / name
        if not path.exists() or file_sha256(path) != digest:
            raise TrainingFailed(
                f"adapter {version} at {entry.path} does not match its registered sha256 ({name})",
                "train from the base model with 'cl train --fresh', or roll back to a sound champion",
            )
    return folder


def lora_shape_mismatch(adapter_config: dict, cfg: TrainConfig) -> list[str]:
    """How an adapter's saved LoRA config differs from the one this run would build (empty: the same shape)."""
    mismatch = []
    if adapter_config.get("r") != cfg.lora_r:
        mismatch.append(f"rank {adapter_config.get('r')} != {cfg.lora_r}")
    if adapter_config.get("lora_alpha") != cfg.lora_alpha:
        mismatch.append(f"alpha {adapter_config.get('lora_alpha')} != {cfg.lora_alpha}")
    wanted = target_modules(cfg)
    if wanted != "all-linear" and set(wanted) != set(adapter_config.get("target_modules") or []):
        mismatch.append("target modules differ")
    return mismatch


def choose_warm_start(settings: Settings, doc: dict, base_sha256: str, fresh: bool) -> WarmStart:
    """The champion to start from, or a fresh adapter (with the reason recorded)."""
    champion = registry.champion_entry(doc)
    if fresh or champion is None:
        return WarmStart(None, None, {"from": None, "reason": "--fresh" if fresh else "no champion"})
    version = doc["champion"]
    if champion.get("base_model", {}).get("sha256") != base_sha256:
        return WarmStart(None, None, {"from": None, "reason": f"champion {version} has another base model"},
                         f"champion {version} was trained on another base model: starting a fresh adapter")
    folder = verified_adapter_dir(settings, doc, version)
    mismatch = lora_shape_mismatch(read_json(folder / "adapter_config.json", default={}) or {}, settings.train)
    if mismatch:
        shape = ", ".join(mismatch)
        return WarmStart(None, None, {"from": None, "reason": f"champion {version} LoRA shape differs: {shape}"},
                         f"champion {version} has another LoRA shape ({shape}): starting a fresh adapter")
    return WarmStart(version, folder, {"from": version})
