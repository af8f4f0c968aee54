"""The compact form of a run's selected examples: spooled to disk, small columns in memory.

A run over a big log selects hundreds of thousands of examples. Holding each as an Example (texts, shingles, ids)
made peak memory grow with the log, so `run_curate` parks every selected example as one line in a temp file beside
the snapshots (`.*.tmp`: a killed run's leftover is removed by the next one) and keeps only fixed-size columns per
example: what the stages need to decide, computed as each example arrives. Decisions read texts back from the spool
only for the few candidate pairs MinHash proposes. Every decision is the one the list functions of the reference
oracle (tests/curate_oracle.py) make (same order, ties, survivors and merged sources).
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from ..storage.crypto import cipher_from_env
from ..storage.store import FILE_MODE, dumps_line, ensure_dir, temp_file
from .examples import Example, open_record, seal_record
from .minhash import NearIndex
from .text import normalise, short_hash

_CHUNK = 4096


def hex64(text: str) -> int:
    """A hex digest as the number it spells (sorts as its fixed-width text does)."""
    return int(text, 16)


def _utf8(text: str) -> bytes:
    # UTF-8 byte order is code point order, so numpy's bytes comparison orders these as Python orders the strings
    return text.encode("utf-8", "surrogatepass")


def give_back_freed_memory() -> None:
    """Hand the heap pages freed by the many small column pieces back to the OS (glibc keeps them otherwise, and
    they would count in peak memory as if still used). A no-op where the C library has no malloc_trim."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


class Spool:
    """Selected examples as sealed JSONL lines in a temp file; read back by (offset, length)."""

    def __init__(self, folder: Path):
        self.folder, self._made_folder = folder, not folder.exists()
        self.path: Path | None = None
        self._file: Any = None
        self.size = 0
        self._unflushed = False
        self._cipher = cipher_from_env()
        self._key_files: list[KeyFile] = []
        self._on_close: list[Callable[[], None]] = []

    def _open(self) -> None:  # on the first example, so a run that selects nothing creates nothing
        ensure_dir(self.folder)
        fd, name = temp_file(self.folder / "curate_spool", prefix=".curate_spool.")
        os.fchmod(fd, FILE_MODE)
        self.path, self._file = Path(name), os.fdopen(fd, "w+b")

    def add(self, example: Example) -> tuple[int, int]:
        if self._file is None:
            self._open()
        line = dumps_line(seal_record(example.to_record(), self._cipher))
        self._file.write(line)
        self._unflushed = True
        offset, self.size = self.size, self.size + len(line)
        return offset, len(line)

    def record(self, offset: int, length: int) -> dict:
        if self._unflushed:
            self._file.flush()
            self._unflushed = False
        return open_record(orjson.loads(os.pread(self._file.fileno(), length, offset)), self._cipher)

    def on_close(self, callback: Callable[[], None]) -> None:
        """Run `callback` when the spool closes (before its files go), on success and failure alike."""
        self._on_close.append(callback)

    def key_file(self, kind: str, bands: int) -> KeyFile:
        """A temp file beside the spool for one kind of band keys, removed with it."""
        keys = KeyFile(self.folder, kind, bands)
        self._key_files.append(keys)
        return keys

    def close(self) -> None:
        for callback in self._on_close:
            callback()
        for keys in self._key_files:
            keys.close()
        if self._file is not None:
            self._file.close()
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        if self._made_folder:
            with contextlib.suppress(OSError):
                self.folder.rmdir()  # only when still empty


class KeyFile:
    """MinHash band keys (`bands` uint32 per example, in arrival order) appended to a temp file as they are
    computed, and read back for the rows one stage asks for. They are a run's largest columns (two kinds of 64
    bytes per example), and each is needed by one stage only (text keys by near-dedupe, prompt keys by the split),
    after the feedback tables of pass 2 are gone: held in memory from arrival on, they decided the peak.
    The keys are hashes of hashed shingles, not text; the file is 0600 and removed with the spool."""

    def __init__(self, folder: Path, kind: str, bands: int):
        self.folder, self.kind, self.bands = folder, kind, bands
        self.path: Path | None = None
        self._fd: int | None = None
        self.rows = 0

    def append(self, keys: Any) -> None:
        if self._fd is None:
            ensure_dir(self.folder)
            self._fd, name = temp_file(self.folder / f"curate_{self.kind}_keys", prefix=f".curate_{self.kind}_keys.")
            self.path = Path(name)
        data = keys.astype("<u4", copy=False).tobytes()
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]
        self.rows += len(keys)

    def gather(self, rows: Any, chunk_rows: int = 1 << 16) -> Any:
        """(len(rows) x bands) keys of these rows, in their order, read in chunks (never the whole file at once)."""
        import numpy as np

        out = np.empty((len(rows), self.bands), dtype=np.uint32)
        if not len(rows):
            return out
        order = np.argsort(rows, kind="stable")
        wanted = rows[order]
        for start in range(0, int(wanted[-1]) + 1, chunk_rows):
            lo, hi = np.searchsorted(wanted, [start, start + chunk_rows])
            if lo == hi:
                continue
            count = min(chunk_rows, self.rows - start) * self.bands
            raw = os.pread(self._fd, count * 4, start * self.bands * 4)
            chunk = np.frombuffer(raw, dtype="<u4").reshape(-1, self.bands)
            out[order[lo:hi]] = chunk[wanted[lo:hi] - start]
        return out

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


class _KeyWorker:
    """MinHash band keys of one chunk of texts and prompts, computed in a helper thread while the main thread
    parses the next chunk (numpy releases the interpreter lock while it hashes, so the two share the machine's
    cores). One chunk is in flight at a time: `submit` hands over a chunk and returns the previous chunk's keys,
    so keys come back in arrival order and at most two chunks of texts are held."""

    def __init__(self, index: NearIndex):
        from concurrent.futures import ThreadPoolExecutor

        self._index = index
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="curate-minhash")
        self._pending: Any = None

    def _keys(self, texts: list[str], prompts: list[str]) -> tuple[Any, Any]:
        return self._index.band_keys(texts), self._index.band_keys(prompts)

    def submit(self, texts: list[str], prompts: list[str]) -> tuple[Any, Any] | None:
        done = self.drain()
        self._pending = self._executor.submit(self._keys, texts, prompts)
        return done

    def drain(self) -> tuple[Any, Any] | None:
        """The keys of the chunk in flight (None when there is none); an error in the helper is raised here."""
        pending, self._pending = self._pending, None
        return None if pending is None else pending.result()

    def stop(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


class ExamplePool:
    """The selected examples of one run: spooled lines plus numpy columns (rank, ids, times, domain, MinHash band
    keys of the text and of the prompt, on disk), and the merged sources/users of duplicates that absorbed others."""

    def __init__(self, spool: Spool, seed: int, threshold: float):
        self.spool, self.seed, self.threshold = spool, str(seed), threshold
        self.near = threshold < 1
        self._index = NearIndex(threshold) if self.near else None
        bands = self._index.bands if self._index else 0
        self._text_keys = spool.key_file("text", bands) if self.near else None
        self._prompt_keys = spool.key_file("prompt", bands) if self.near else None
        self._hashing = _KeyWorker(self._index) if self.near else None
        spool.on_close(self._stop_hashing)
        self.tools: list[str] = []
        self._tool_codes: dict[str, int] = {}
        self._rows: list[tuple] = []
        self._texts: list[str] = []
        self._prompts: list[str] = []
        self._chunks: list[dict[str, Any]] = []
        self.cols: dict[str, Any] = {}
        self.extras: dict[int, tuple[list[str], list[str]]] = {}  # row -> merged (source_ids, user_hashes)

    # building
    def add(self, example: Example) -> None:
        offset, _ = self.spool.add(example)
        tool = -1 if example.target_tool is None else self._tool_codes.setdefault(example.target_tool,
                                                                                   len(self._tool_codes))
        if tool == len(self.tools):
            self.tools.append(example.target_tool)
        kind, rating, recorded = example.rank
        same_time = example.created_at == recorded  # the usual case: then `created` stays empty, saving its bytes
        created = b"" if same_time else _utf8(example.created_at)
        prompt_hash = hex64(short_hash(self.seed, example.prompt_key))
        self._rows.append((hex64(example.id), offset, kind, rating, _utf8(recorded), same_time, created, tool,
                           prompt_hash))
        if self.near:
            self._texts.append(example.text)
            self._prompts.append(example.prompt_key)
        if len(self._rows) >= _CHUNK:
            self._flush()

    def _flush(self) -> None:
        import numpy as np

        if not self._rows and self._chunks:
            return
        names = ("id", "offset", "kind", "rating", "recorded", "same_time", "created", "tool", "prompt_hash")
        dtypes = (np.uint64, np.int64, np.int8, np.float64, bytes, np.bool_, bytes, np.int32, np.uint64)
        columns = list(zip(*self._rows)) or [()] * len(names)
        chunk = {name: np.array(values, dtype=dtype) for name, values, dtype in zip(names, columns, dtypes)}
        if self.near:
            self._store_keys(self._hashing.submit(self._texts, self._prompts))
        self._chunks.append(chunk)
        self._rows, self._texts, self._prompts = [], [], []

    def _store_keys(self, keys: tuple[Any, Any] | None) -> None:
        if keys is not None:
            self._text_keys.append(keys[0])
            self._prompt_keys.append(keys[1])

    def _stop_hashing(self) -> None:
        if self._hashing is not None:
            self._hashing.stop()

    def finish(self) -> None:
        import numpy as np

        self._flush()
        if self.near:
            self._store_keys(self._hashing.drain())
            self._stop_hashing()
        for name in list(self._chunks[0]):  # column by column, freeing the pieces as it goes
            self.cols[name] = np.concatenate([chunk.pop(name) for chunk in self._chunks])
        self._chunks = []
        give_back_freed_memory()

    def __len__(self) -> int:
        return len(self.cols["id"]) if self.cols else 0

    # reading back
    def record(self, row: int) -> dict:
        offsets = self.cols["offset"]  # lines lie back to back in the spool: a line ends where the next begins
        start = int(offsets[row])
        end = int(offsets[row + 1]) if row + 1 < len(offsets) else self.spool.size
        record = self.spool.record(start, end - start)
        if row in self.extras:
            record["source_ids"], record["user_hashes"] = (list(x) for x in self.extras[row])
        return record

    def example(self, row: int) -> Example:
        return Example.from_record(self.record(row))

    def text(self, row: int) -> str:
        """`Example.text` of a row, straight from its spooled messages (already cleaned when they were spooled)."""
        messages = self.record(row)["messages"]
        return "\n".join(normalise(m["content"]) for m in messages if m["role"] != "system")

    def prompt_key(self, row: int) -> str:
        """`Example.prompt_key` of a row, straight from its spooled messages."""
        messages = self.record(row)["messages"]
        return normalise(next((m["content"] for m in reversed(messages) if m["role"] == "user"), ""))

    def rank(self, row: int) -> tuple:
        recorded = self.cols["recorded"][row].decode("utf-8", "surrogatepass")
        return int(self.cols["kind"][row]), float(self.cols["rating"][row]), recorded

    def absorb(self, keep: int, drop: int) -> None:
        """`Example.absorb` where `keep` is known to win: keep's sources first, users merged and sorted."""
        kept, dropped = self.record(keep), self.record(drop)
        sources = list(dict.fromkeys(kept["source_ids"] + dropped["source_ids"]))
        self.extras[keep] = (sources, sorted(set(kept["user_hashes"]) | set(dropped["user_hashes"])))

    def rank_desc(self, rows: Any) -> Any:
        """`sorted(rows, key=rank, reverse=True)`: best first, equal ranks in their given order."""
        import numpy as np

        if len(rows) == 0:
            return rows
        _, recorded = np.unique(self.cols["recorded"][rows], return_inverse=True)
        order = np.lexsort((np.arange(len(rows)), -recorded.astype(np.int64), -self.cols["rating"][rows],
                            -self.cols["kind"][rows].astype(np.int64)))
        return rows[order]

    def text_band_keys(self, rows: Any) -> Any:
        """Band keys of these rows' texts (computed on arrival, kept on disk until near-dedupe asks)."""
        return self._text_keys.gather(rows)

    def prompt_band_keys(self, rows: Any) -> Any:
        """Band keys of these rows' prompts (computed on arrival: reading millions of prompts back from the spool
        for them took minutes)."""
        return self._prompt_keys.gather(rows)

    def forget_text_keys(self) -> None:
        """Near-dedupe is done: its keys are not needed again."""
        if self._text_keys is not None:
            self._text_keys.close()

    def tool_of(self, row: int) -> str | None:
        code = int(self.cols["tool"][row])
        return None if code < 0 else self.tools[code]


def recent(read: Callable[[int], str], limit: int = 4096) -> Callable[[int], str]:
    """`read` with the texts of recent positions kept (candidates cluster around the same earlier texts); emptied
    when full, so it holds a few MB at most."""
    cache: dict[int, str] = {}

    def cached(k: int) -> str:
        text = cache.get(k)
        if text is None:
            if len(cache) >= limit:
                cache.clear()
            text = cache[k] = read(k)
        return text

    return cached
