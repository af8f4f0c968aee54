"""File integrity: the one sha256 the registry records for adapter weights, snapshots and base models."""
from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """The one file digest the registry records and verifies (adapter weights, snapshots, base models)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
