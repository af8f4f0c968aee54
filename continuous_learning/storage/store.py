"""JSONL and JSON files: locked whole-line appends, a streaming reader that survives a torn last line,
and atomic rewrites (temp file, fsync, rename). User data: files 0600, folders 0700."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from filelock import FileLock, Timeout

from ..core.errors import CLError, InputError, LockHeldError
from ..core.records import BadRecord, Feedback, FeedbackEvent, Interaction, parse_log_record

FILE_MODE = 0o600
DIR_MODE = 0o700
# Every temp file this tool writes is named `.<target>.<8 random chars>.cl-tmp`; cleanup removes only such names
# (and `.<target>.<8 random chars>.tmp`, the name earlier versions used), never anything else in a folder.
TEMP_SUFFIX = ".cl-tmp"
_OWN_TEMP = re.compile(r"^\..+\.[a-z0-9_]{8}(\.cl-tmp|\.tmp)$")


def ensure_dir(path: Path) -> Path:
    """Create a folder and any missing parents as 0700 (mkdir's mode applies to the leaf only)."""
    try:
        for folder in reversed([path, *path.parents]):
            if not folder.exists():
                folder.mkdir(mode=DIR_MODE, exist_ok=True)
    except PermissionError:
        raise CLError(f"cannot create folder {path}: permission denied",
                      "choose a writable workspace with --home") from None
    except OSError as exc:  # a file where a folder must go, a full disk, a read-only file system...
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise CLError(f"cannot create folder {path}: {reason}",
                      "choose a writable workspace with --home, or move away what is in the way") from None
    return path


def _disk_error(path: Path, exc: OSError) -> CLError:
    if exc.errno == errno.ENOSPC:
        return CLError(f"disk full while writing {path}", "free some space and run the command again; nothing stored "
                                                          "was changed")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return CLError(f"cannot write {path}: {os.strerror(exc.errno)}", "make the workspace writable or choose "
                                                                         "another with --home")
    return CLError(f"cannot write {path}: {exc}")


@contextlib.contextmanager
def file_lock(path: Path, timeout: float = 30.0):
    """The append lock of one file. One lock object per path in this process (filelock's singleton), so a thread
    that holds it may take it again (e.g. check, then append) while other threads and processes wait."""
    lock = FileLock(str(path) + ".lock", mode=FILE_MODE, is_singleton=True)
    with lock.acquire(timeout=timeout):
        yield


def dumps_line(record: Any) -> bytes:
    return orjson.dumps(record) + b"\n"


def append_jsonl(path: Path, records: Iterable[Any]) -> int:
    """Append records as whole lines in ONE write under an advisory lock. Returns the count appended."""
    payload = b"".join(dumps_line(r) for r in records)
    if not payload:
        return 0
    ensure_dir(path.parent)
    try:
        with file_lock(path):
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, FILE_MODE)
            try:
                size = os.fstat(fd).st_size
                if _ends_torn(fd):  # a writer died mid-line: start ours on a fresh line
                    payload = b"\n" + payload
                try:
                    _write_all(fd, payload)
                    os.fsync(fd)
                except OSError:  # e.g. ENOSPC after part of the payload went out: leave no half record behind
                    with contextlib.suppress(OSError):
                        os.ftruncate(fd, size)
                    raise
            finally:
                os.close(fd)
    except OSError as exc:
        raise _disk_error(path, exc) from None
    return payload.count(b"\n") - (1 if payload.startswith(b"\n") else 0)


def _ends_torn(fd: int) -> bool:
    size = os.fstat(fd).st_size
    return size > 0 and os.pread(fd, 1, size - 1) != b"\n"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


@dataclass
class ReadReport:
    """What a streaming read skipped, so callers can tell the user."""

    bad_lines: list[tuple[int, str]] = field(default_factory=list)  # (line number, reason)
    torn_tail: bool = False

    @property
    def skipped(self) -> int:
        return len(self.bad_lines)

    def note(self, number: int, reason: str, keep: int = 1000) -> None:
        """Count a skipped line; only the first `keep` reasons are kept (a damaged log must not fill memory)."""
        self.bad_lines.append((number, reason if len(self.bad_lines) < keep else ""))


MAX_RECORD_BYTES = 16 * 1024 * 1024  # records this tool writes are far smaller; longer lines are damage


def iter_jsonl(path: Path, report: ReadReport | None = None,
               max_line_bytes: int = MAX_RECORD_BYTES) -> Iterator[tuple[int, Any]]:
    """Stream (line number, parsed record). Undecodable or over-long lines are skipped and noted in `report`."""
    for number, _, record in iter_jsonl_lines(path, report, max_line_bytes):
        yield number, record


def iter_jsonl_lines(path: Path, report: ReadReport | None = None,
                     max_line_bytes: int = MAX_RECORD_BYTES) -> Iterator[tuple[int, bytes, Any]]:
    """`iter_jsonl` with each record's raw line beside it (callers that can skip work by looking at the bytes)."""
    report = report if report is not None else ReadReport()
    if not path.exists():
        return
    with open(path, "rb") as handle:
        for number, raw in bounded_lines(handle, max_line_bytes):
            if raw is None:
                report.bad_lines.append((number, f"line longer than {max_line_bytes} bytes"))
                continue
            if not raw.endswith(b"\n"):
                report.torn_tail = True
            if not raw.strip():
                continue
            try:
                yield number, raw, orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                reason = "torn last line" if not raw.endswith(b"\n") else f"not valid JSON ({exc})"
                report.bad_lines.append((number, reason))


def read_log(path: Path, report: ReadReport | None = None, cipher=None, open_texts: bool = False,
             max_line_bytes: int = MAX_RECORD_BYTES) -> Iterator[tuple[int, Interaction | FeedbackEvent]]:
    """The ONE tolerant reader of the raw log: (line number, Interaction | FeedbackEvent) for every well-shaped
    record. Bad JSON, torn or over-long lines and records of the wrong shape (a field of the wrong type) are
    skipped and counted in `report`; other kinds of line (events) are passed over. With `open_texts`, sealed
    texts are decrypted with `cipher` (a wrong or missing key raises: it is never a skipped line); without, they
    stay sealed strings (enough for counting)."""
    from .crypto import open_messages

    report = report if report is not None else ReadReport()
    for number, raw in iter_jsonl(path, report, max_line_bytes):
        try:
            record = parse_log_record(open_messages(raw, cipher) if open_texts else raw)
        except BadRecord as exc:
            report.note(number, str(exc))
            continue
        if record is not None:
            yield number, record


def late_feedback(path: Path, report: ReadReport | None = None) -> dict[str, Feedback]:
    """Every feedback event merged per interaction id, in log order (texts stay as stored)."""
    merged: dict[str, Feedback] = {}
    for _, record in read_log(path, report):
        if isinstance(record, FeedbackEvent):
            key = record.interaction_id
            merged[key] = merged[key].merged(record.feedback) if key in merged else record.feedback
    return merged


def joined_interactions(path: Path, report: ReadReport | None = None, cipher=None,
                        open_texts: bool = False) -> Iterator[Interaction]:
    """The ONE join of late feedback onto its turn: every well-shaped interaction with the feedback events that
    point at it merged in (two streaming passes; only the merged feedback of rated turns is held)."""
    report = report if report is not None else ReadReport()
    later = late_feedback(path, ReadReport())  # its skipped lines are the same lines, counted once below
    for _, record in read_log(path, report, cipher, open_texts):
        if isinstance(record, Interaction):
            if record.id in later:
                record.feedback = record.feedback.merged(later[record.id])
            yield record


def find_joined(path: Path, interaction_id: str, cipher=None) -> Interaction | None:
    """One interaction with every later feedback event on it merged in (one streaming pass through the shared
    reader, so a wrongly shaped line on the way is skipped, never fatal), or None."""
    found: Interaction | None = None
    for _, record in read_log(path, cipher=cipher, open_texts=True):
        if isinstance(record, Interaction) and record.id == interaction_id:
            found = record
        elif found is not None and isinstance(record, FeedbackEvent) and record.interaction_id == interaction_id:
            found.feedback = found.feedback.merged(record.feedback)
    return found


def bounded_lines(handle, limit: int) -> Iterator[tuple[int, bytes | None]]:
    """(number, line) pairs; a line longer than `limit` comes as None and is skipped without being held whole."""
    number = 0
    while raw := handle.readline(limit + 1):
        number += 1
        if len(raw) > limit:
            while raw and not raw.endswith(b"\n"):
                raw = handle.readline(1 << 20)
            yield number, None
        else:
            yield number, raw


def read_json(path: Path, default: Any = None) -> Any:
    if not path.exists():
        return default
    try:
        return orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as exc:
        raise InputError(f"{path} is not valid JSON ({exc})", "restore it from a backup or delete it") from None


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename over the target: all or nothing."""
    atomic_write_lines(path, [data])


def atomic_write_lines(path: Path, lines: Iterable[bytes]) -> str:
    """`atomic_write_bytes` for a stream of chunks (never all in memory); returns the sha256 of what was written."""
    ensure_dir(path.parent)
    digest = hashlib.sha256()
    fd, tmp = temp_file(path)
    try:
        pending, size = [], 0
        for line in lines:
            digest.update(line)
            pending.append(line)
            size += len(line)
            if size >= 1 << 20:  # write in ~1 MB pieces
                _write_all(fd, b"".join(pending))
                pending, size = [], 0
        _write_all(fd, b"".join(pending))
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise _disk_error(path, exc) from None
    return digest.hexdigest()


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, orjson.dumps(data, option=orjson.OPT_INDENT_2) + b"\n")


def atomic_write_jsonl(path: Path, records: Iterable[Any]) -> None:
    atomic_write_bytes(path, b"".join(dumps_line(r) for r in records))


def fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def temp_file(target: Path, prefix: str | None = None) -> tuple[int, str]:
    """A new 0600 temp file beside `target`, named so that `remove_stale_temp_files` knows it is ours."""
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=prefix or f".{target.name}.", suffix=TEMP_SUFFIX)
    os.fchmod(fd, FILE_MODE)
    return fd, name


def is_own_temp_file(path: Path) -> bool:
    return path.is_file() and not path.is_symlink() and bool(_OWN_TEMP.match(path.name))


def remove_stale_temp_files(folder: Path) -> int:
    """Temp files left by a process killed mid-write are garbage: the rename never happened. Only files named
    the way this tool names its temp files are removed; anything else in the folder is left alone."""
    removed = 0
    if folder.exists():
        for tmp in folder.iterdir():
            if is_own_temp_file(tmp):
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
                    removed += 1
    return removed


@contextlib.contextmanager
def workspace_lock(lock_dir: Path, name: str, wait: float = 0.0):
    """Exclusive lock for commands that change shared state (registry, training, rewrites).

    flock-based: the kernel drops it when the holder dies, so a killed process never leaves a stale lock.
    """
    ensure_dir(lock_dir)
    lock_path = lock_dir / f"{name}.lock"
    owner_file = lock_dir / f"{name}.owner"
    lock = FileLock(str(lock_path), timeout=wait, mode=FILE_MODE)
    try:
        lock.acquire()
    except Timeout:
        holder = owner_file.read_text(encoding="utf-8").strip() if owner_file.exists() else "another process"
        raise LockHeldError(
            f"the workspace '{name}' lock is held by {holder}",
            "wait for that command to finish and run this one again",
        ) from None
    try:
        owner_file.write_text(f"pid {os.getpid()}", encoding="utf-8")
        yield
    finally:
        with contextlib.suppress(OSError):
            owner_file.unlink()
        lock.release()
