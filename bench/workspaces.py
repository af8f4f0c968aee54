"""Throwaway workspaces for the benchmarks (registry with many adapters, model cache location)."""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .common import CACHE_DIR

SALT = "bench-salt"


def model_cache() -> Path:
    """Where the bundled GGUF is converted once and reused by later runs."""
    return Path(os.environ.get("CL_BENCH_MODEL_CACHE") or CACHE_DIR / "models")


def new_home(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"clbench_{prefix}_"))


@contextmanager
def temp_home(prefix: str) -> Iterator[Path]:
    """A throwaway workspace, removed afterwards whatever happens."""
    home = new_home(prefix)
    try:
        yield home
    finally:
        shutil.rmtree(home, ignore_errors=True)


# torch's default of one thread per core is 4-6x slower than one thread when the 2 cores are shared (load average
# 4-6 while these benchmarks ran): model benchmarks run both paths with one thread, set through the project's knob.
MODEL_THREADS = os.environ.get("CL_BENCH_MODEL_THREADS", "1")


def workspace_env(home: Path, **extra: str) -> dict:
    return {"CL_HOME": str(home), "CL_MODEL_CACHE": str(model_cache()), "CL_USER_HASH_SALT": SALT,
            "CL_MODEL_THREADS": MODEL_THREADS, **extra}


def apply_env(env: dict) -> None:
    os.environ.update(env)


def registry_with_promotions(settings, versions: int, adapter_bytes: int) -> list[str]:
    """`versions` adapters, each promoted in turn (so rollback has `versions` steps of history), each folder
    holding an adapter_config.json and a weights file of `adapter_bytes` with its sha256 recorded."""
    from continuous_learning import registry
    from continuous_learning.storage.store import atomic_write_json, ensure_dir

    doc = registry.load(settings)
    names = [f"1.{i}.0" for i in range(versions)]
    payload = os.urandom(adapter_bytes)
    for i, version in enumerate(names):
        folder = ensure_dir(settings.adapters_dir / version)
        weights = payload[:-8] + i.to_bytes(8, "little")
        (folder / "adapter_model.safetensors").write_bytes(weights)
        atomic_write_json(folder / "adapter_config.json", {"r": 16, "version": version})
        digests = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}
        doc["adapters"][version] = {"version": version, "status": "candidate", "path": f"adapters/{version}",
                                    "sha256": digests, "evals": [], "created_at": f"2026-01-01T00:00:{i % 60:02d}Z"}
        registry.promote(doc, version, "bench")
    registry.update(settings, lambda _: doc, "bench_setup", versions=versions)
    return names
