"""The tamper-evident audit trail: one hash-chained JSON line per decision.

Why a chain: an auditor must be able to tell whether records were edited, removed, inserted or reordered
after the fact. Each record carries `prev`, the SHA-256 of the previous record's exact line bytes, and `hash`,
the SHA-256 of its own canonical form without `hash`. Editing a record breaks its own `hash`; removing,
inserting or moving one breaks the next record's `prev`; `seq` makes gaps obvious to a human reader. A chain
cannot stop someone who rewrites every record from the tampered one to the end, so operators should copy the
head (`VerifyResult.head`) somewhere else from time to time to pin it.

Why the lock and the head cache: the server and the CLI append to the same file. Every append holds an
exclusive flock on `<path>.lock`, so exactly one writer at a time reads the chain head, appends and fsyncs.
A process re-reads the head only when the file is not as it left it, so a lone server never re-reads.

Why group commit: an fsync costs milliseconds, and one per request would cap the server's throughput. Records
that arrive while a write is in flight are written together with one write() and one fsync(); each caller
returns only once its own line is durable.

Records never hold key material or ciphertexts: events naming a FORBIDDEN_FIELDS key anywhere are refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import getpass
import hashlib
import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Protocol

from lkm.fsutil import fsync_dir
from lkm.workers import WorkerThreads

__all__ = [
    "FIRST_SEQ",
    "FORBIDDEN_FIELDS",
    "GENESIS_PREV",
    "RESERVED_FIELDS",
    "AuditLog",
    "AuditWriteError",
    "VerifyResult",
    "chain_files",
    "local_actor",
    "rotated_files",
    "utc_timestamp",
    "verify",
    "verify_chain_files",
]

log = logging.getLogger(__name__)

GENESIS_PREV: Final = "0" * 64
FIRST_SEQ: Final = 1

# Compared case-insensitively against every key at every depth. "key_id" is fine; "key" is not.
FORBIDDEN_FIELDS: Final[frozenset[str]] = frozenset({
    "key",
    "key_material",
    "wrapped_key",
    "unwrapped_key",
    "private_key",
    "plaintext",
    "ciphertext",
    "body",
    "secret",
    "password",
})

# Set by the chain itself; a caller supplying them could forge the chain's bookkeeping.
RESERVED_FIELDS: Final[frozenset[str]] = frozenset({"seq", "prev", "hash"})

_ROTATED_FORMAT: Final = "%Y%m%dT%H%M%S%fZ"
_READ_BLOCK: Final = 64 * 1024


class _AuditSettings(Protocol):
    """What from_settings reads (lkm.config.AuditSettings); a protocol keeps this module free of config."""

    @property
    def path(self) -> Path: ...
    @property
    def fail_closed(self) -> bool: ...
    @property
    def max_bytes(self) -> int: ...
    @property
    def keep_files(self) -> int: ...


class AuditWriteError(Exception):
    """The record is not durable. A fail-closed server must not act on the decision it describes."""


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    records: int  # records found intact (before the first bad one, when not ok)
    files: int  # files opened
    first_bad_file: str | None = None
    first_bad_line: int | None = None  # 1-based, within first_bad_file
    first_bad_seq: int | None = None
    reason: str | None = None
    # True when the oldest record is not the genesis record (older files pruned): its prev was taken on trust.
    anchored: bool = False
    note: str | None = None
    last_seq: int | None = None
    head: str | None = None  # SHA-256 of the last intact line: what the next record's prev must be


@dataclass(frozen=True)
class _Head:
    seq: int
    digest: str


_GENESIS: Final = _Head(FIRST_SEQ - 1, GENESIS_PREV)


def _canonical(obj: Any) -> bytes:
    """The one byte form used both for the line and for hashing, so verification can recompute it."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


_second_prefix: tuple[int, str] = (-1, "")  # the last second formatted, and its text up to the dot


def utc_timestamp(now: datetime | None = None) -> str:
    """RFC 3339 UTC with milliseconds: sortable as text and unambiguous across hosts.

    Every audited request stamps one, so the current time reuses the last second's formatted text.
    """
    if now is not None:
        dt = now.astimezone(UTC)
        return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"
    global _second_prefix  # noqa: PLW0603 - one tuple, replaced whole, so readers on any thread see a pair
    ns = time.time_ns()
    second, millis = divmod(ns // 1_000_000, 1000)
    cached_second, prefix = _second_prefix
    if second != cached_second:
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(second))
        _second_prefix = (second, prefix)
    return f"{prefix}{millis:03d}Z"


def local_actor() -> dict[str, Any]:
    """Who ran the CLI: the OS account is the only identity a local operator has."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no login name in the environment nor in the password database
        user = str(os.getuid())
    return {"kind": "cli", "user": user, "host": socket.gethostname(), "pid": os.getpid()}


def _find_forbidden(obj: Any, where: str = "") -> str | None:
    if isinstance(obj, Mapping):
        for name, value in obj.items():
            here = f"{where}.{name}" if where else str(name)
            if str(name).lower() in FORBIDDEN_FIELDS:
                return here
            found = _find_forbidden(value, here)
            if found is not None:
                return found
    elif isinstance(obj, list | tuple):
        for index, value in enumerate(obj):
            found = _find_forbidden(value, f"{where}[{index}]")
            if found is not None:
                return found
    return None


def _prepare(event: Mapping[str, Any]) -> dict[str, Any]:
    """Checks and snapshots an event in the caller's context, so a bad event fails its caller alone
    (not the whole batch it would have joined) and later mutation by the caller cannot change it."""
    if not isinstance(event, Mapping):
        raise TypeError(f"an audit event is a mapping, not {type(event).__name__}")
    forbidden = _find_forbidden(event)
    if forbidden is not None:
        # Name the field, never its value: the value is what must not leak.
        raise ValueError(f"audit events must not carry key material or payloads: field {forbidden!r}")
    reserved = sorted(RESERVED_FIELDS & {str(k) for k in event})
    if reserved:
        raise ValueError(f"audit event fields {reserved} are set by the audit chain itself")
    body: dict[str, Any] = json.loads(_canonical(dict(event)))
    body.setdefault("time", utc_timestamp())
    return body


def _seal(body: dict[str, Any], head: _Head) -> tuple[bytes, _Head]:
    record = dict(body)
    record["seq"] = head.seq + 1
    record["prev"] = head.digest
    record["hash"] = _sha256(_canonical(record))
    line = _canonical(record)
    return line + b"\n", _Head(head.seq + 1, _sha256(line))


def rotated_files(path: Path) -> list[Path]:
    """`path`'s rotated siblings, oldest first: the fixed-width UTC suffix makes name order chain order."""
    pattern = re.compile(re.escape(path.name) + r"\.\d{8}T\d{12}Z\Z")
    try:
        names = os.listdir(path.parent)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [path.parent / name for name in sorted(n for n in names if pattern.match(n))]


def chain_files(path: Path) -> list[Path]:
    """Every file of the chain, oldest first, the current file last."""
    files = rotated_files(path)
    if path.exists():
        files.append(path)
    return files


def _suffix_time(rotated: Path) -> datetime:
    return datetime.strptime(rotated.name.rsplit(".", 1)[1], _ROTATED_FORMAT).replace(tzinfo=UTC)


def _last_line(path: Path) -> tuple[bytes | None, int, int]:
    """(last complete line without its newline, size up to and including its newline, file size).

    Reads backwards so the cost does not grow with the file.
    """
    with path.open("rb") as f:
        size = f.seek(0, os.SEEK_END)
        pos = size
        buf = b""
        while pos > 0 and buf.count(b"\n") < 2:
            step = min(_READ_BLOCK, pos)
            pos -= step
            f.seek(pos)
            buf = f.read(step) + buf
    last_nl = buf.rfind(b"\n")
    if last_nl < 0:
        return None, 0, size
    start = buf.rfind(b"\n", 0, last_nl) + 1
    return buf[start:last_nl], pos + last_nl + 1, size


class AuditLog:
    """An append-only, hash-chained, size-rotated audit file shared by every lkm process on the host.

    `record()` (server) and `record_sync()` (CLI) return only once the record is fsynced, and raise
    AuditWriteError otherwise. `fail_closed` is carried for the server, which decides what a failure means.
    `on_failure` runs on the thread that saw the failure (the audit writer thread or record_sync's caller),
    and `on_written(n)` on the thread that made n records durable, so both must be thread-safe and quick,
    e.g. a metrics counter.
    """

    def __init__(self, path: Path, *, max_bytes: int = 0, keep_files: int = 0, fail_closed: bool = True,
                 on_failure: Callable[[], None] | None = None,
                 on_written: Callable[[int], None] | None = None) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.max_bytes = max_bytes  # 0: never rotate
        self.keep_files = keep_files  # rotated files kept; 0: keep all
        self.fail_closed = fail_closed
        self.on_failure = on_failure
        self.on_written = on_written
        self.healthy = True
        self.write_failures = 0
        self.last_error: str | None = None
        # Counters for tests and metrics.
        self.fsync_count = 0
        self.batch_count = 0
        self.records_written = 0
        self.head_reads = 0
        self.rotations = 0
        self._io_lock = threading.Lock()  # the flock does not serialise threads of one process
        self._head: _Head | None = None
        self._state: tuple[int, int, int, int] | None = None  # (dev, inode, size, mtime_ns) after our write
        self._fd = -1  # the current audit file, kept open between the server's appends
        self._lock_fd = -1  # the lock file, likewise
        self._pending: list[tuple[dict[str, Any], asyncio.Future[None]]] = []
        self._wakeup: asyncio.Event | None = None
        self._writer: asyncio.Task[None] | None = None
        self._thread: WorkerThreads | None = None
        self._closing = False

    @classmethod
    def from_settings(cls, settings: _AuditSettings, *,
                      on_failure: Callable[[], None] | None = None) -> AuditLog:
        return cls(settings.path, max_bytes=settings.max_bytes, keep_files=settings.keep_files,
                   fail_closed=settings.fail_closed, on_failure=on_failure)

    # -- asynchronous, batched -------------------------------------------------------------------------

    async def start(self) -> None:
        if self._closing:
            raise AuditWriteError("audit log is closed")
        if self._writer is not None:
            return
        self._wakeup = asyncio.Event()
        # A thread of its own: audit fsyncs must neither block the loop nor queue behind other blocking work.
        self._thread = WorkerThreads(1, name="lkm-audit")
        self._writer = asyncio.create_task(self._run(), name="lkm-audit-writer")

    async def close(self) -> None:
        """Writes what is pending, then stops the writer; later record() calls fail."""
        self._closing = True
        writer, thread = self._writer, self._thread
        if writer is None:
            return
        assert self._wakeup is not None
        self._wakeup.set()
        try:
            await writer
        finally:
            self._writer = None
            self._thread = None
            if thread is not None:
                thread.close()
            with self._io_lock:
                self._close_files()

    async def __aenter__(self) -> AuditLog:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def record(self, event: Mapping[str, Any]) -> None:
        """Returns once the record is durable; raises AuditWriteError if it could not be made so."""
        body = _prepare(event)
        if self._closing:
            raise AuditWriteError("audit log is closed")
        if self._writer is None:
            await self.start()
        assert self._wakeup is not None
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((body, future))
        self._wakeup.set()
        await future

    async def _run(self) -> None:
        assert self._wakeup is not None and self._thread is not None
        try:
            while True:
                if not self._pending:
                    if self._closing:
                        return
                    await self._wakeup.wait()
                    self._wakeup.clear()
                    continue
                # Everything that queued up while the previous write was in flight goes out in one write.
                batch, self._pending = self._pending, []
                error: BaseException | None = None
                try:
                    await self._thread.run(self._append, [body for body, _ in batch])
                except Exception as exc:
                    error = exc
                for _, future in batch:
                    if future.done():  # its caller was cancelled; the record is written all the same
                        continue
                    if error is None:
                        future.set_result(None)
                    else:
                        failure = AuditWriteError(str(error))
                        failure.__cause__ = error
                        future.set_exception(failure)
        finally:
            # Only reached with records pending if the writer itself was cancelled: nobody may hang.
            stranded, self._pending = self._pending, []
            for _, future in stranded:
                if not future.done():
                    future.set_exception(AuditWriteError("audit writer stopped before writing the record"))

    # -- synchronous, for the CLI ----------------------------------------------------------------------

    def record_sync(self, event: Mapping[str, Any]) -> None:
        """Appends one record and fsyncs before returning; raises AuditWriteError on failure."""
        self._append([_prepare(event)], keep_open=False)

    # -- health ------------------------------------------------------------------------------------------

    def check_writable(self) -> bool:
        """For readiness: whether the next append could open its files and rotation could rename."""
        try:
            for target, flags in ((self.path, os.O_WRONLY | os.O_APPEND), (self.lock_path, os.O_RDWR)):
                fd = os.open(target, flags | os.O_CREAT | os.O_CLOEXEC, 0o600)
                os.close(fd)
        except OSError:
            return False
        return os.access(self.path.parent, os.W_OK | os.X_OK)

    def _note_failure(self, exc: BaseException) -> None:
        self.write_failures += 1
        self.healthy = False
        self.last_error = f"{type(exc).__name__}: {exc}"
        log.error("audit write to %s failed: %s", self.path, self.last_error)
        if self.on_failure is not None:
            try:
                self.on_failure()
            except Exception:
                log.exception("audit on_failure hook raised")

    # -- the append, under both locks ------------------------------------------------------------------

    def _append(self, bodies: list[dict[str, Any]], *, keep_open: bool = True) -> None:
        """Seals and writes `bodies` as one durable append, under both locks.

        The server keeps the lock file and the current audit file open between appends (`keep_open`): an
        append is then flock, stat, write, fsync, fstat and unlock, and each system call saved is one less time
        the writer thread gives up the GIL and must win it back from the event loop and the workers.
        """
        with self._io_lock:
            try:
                lock_fd = self._lock_fd if self._lock_fd >= 0 else self._open_lock()
                fcntl.flock(lock_fd, fcntl.LOCK_EX)
                try:
                    head = self._current_head()
                    lines: list[bytes] = []
                    for body in bodies:
                        line, head = _seal(body, head)
                        lines.append(line)
                    self._write_lines(lines)
                    self._head = head
                finally:
                    fcntl.flock(lock_fd, fcntl.LOCK_UN)
            except Exception as exc:
                # What is on disk is unknown now: the next append must read the head afresh.
                self._head = None
                self._state = None
                self._close_files()
                self._note_failure(exc)
                if isinstance(exc, AuditWriteError):
                    raise
                raise AuditWriteError(f"audit write to {self.path} failed: {exc}") from exc
            finally:
                if not keep_open:
                    self._close_files()
            self.healthy = True
            self.batch_count += 1
            self.records_written += len(bodies)
            if self.on_written is not None:
                self.on_written(len(bodies))

    def _open_lock(self) -> int:
        self._lock_fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        return self._lock_fd

    def _close_files(self) -> None:
        for fd in (self._lock_fd, self._fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._lock_fd = self._fd = -1

    def _current_head(self) -> _Head:
        try:
            st: os.stat_result | None = os.stat(self.path)
        except FileNotFoundError:
            st = None
        if (st is not None and self._head is not None
                and self._state == (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)):
            return self._head
        self._state = None
        if self._fd >= 0:  # another writer appended or rotated: the next write reopens the path
            os.close(self._fd)
            self._fd = -1
        self.head_reads += 1
        if st is not None and st.st_size > 0:
            head = self._head_of(self.path, repair=True)
            if head is not None:
                return head
        for older in reversed(rotated_files(self.path)):
            head = self._head_of(older, repair=False)
            if head is not None:
                return head
        return _GENESIS

    def _head_of(self, path: Path, *, repair: bool) -> _Head | None:
        line, complete, size = _last_line(path)
        if complete < size and repair:
            # A torn tail: a writer died or failed mid-write while holding the lock, so its caller never got
            # an acknowledgement. Appending after it would bury a broken line inside the chain.
            log.warning("audit file %s ends with %d bytes of a torn record; removing them", path,
                        size - complete)
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.ftruncate(fd, complete)
                os.fsync(fd)
            finally:
                os.close(fd)
        if line is None:
            return None
        try:
            seq = json.loads(line)["seq"]
        except (ValueError, TypeError, KeyError):
            seq = None
        if not isinstance(seq, int) or isinstance(seq, bool):
            # Guessing a seq would hide the damage; an operator has to look (lkm audit verify).
            raise AuditWriteError(f"cannot continue the audit chain: the last record of {path} is unreadable")
        return _Head(seq, _sha256(line))

    def _open_current(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def _write_lines(self, lines: list[bytes]) -> None:
        if self._fd >= 0:  # kept open only while _state describes it (_current_head closes it otherwise)
            assert self._state is not None
            fd, size = self._fd, self._state[2]
        else:
            fd = self._fd = self._open_current()
            size = os.fstat(fd).st_size
        fresh = size == 0  # its directory entry may not be durable yet
        chunk: list[bytes] = []
        chunk_len = 0
        for line in lines:
            if 0 < self.max_bytes < size + chunk_len + len(line) and size + chunk_len > 0:
                if chunk:
                    self._write_durably(fd, b"".join(chunk), size)
                    size += chunk_len
                    chunk, chunk_len = [], 0
                self._fd = -1
                os.close(fd)
                self._rotate()
                fd = self._fd = self._open_current()
                size = os.fstat(fd).st_size
                fresh = True
            chunk.append(line)
            chunk_len += len(line)
        self._write_durably(fd, b"".join(chunk), size)
        if fresh:
            fsync_dir(self.path.parent)
        st = os.fstat(fd)
        self._state = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def _write_durably(self, fd: int, data: bytes, size_before: int) -> None:
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        except OSError:
            # Take back a partial write, so the file never holds a torn line (best effort: the next
            # writer repairs a torn tail too).
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size_before)
            raise
        self.fsync_count += 1

    def _rotate(self) -> None:
        existing = rotated_files(self.path)
        stamp = datetime.now(UTC)
        if existing:
            # Names must sort in chain order even if the clock steps back or two rotations share a tick.
            newest = _suffix_time(existing[-1])
            if stamp <= newest:
                stamp = newest + timedelta(microseconds=1)
        target = self.path.with_name(f"{self.path.name}.{stamp.strftime(_ROTATED_FORMAT)}")
        os.rename(self.path, target)
        fsync_dir(self.path.parent)
        self.rotations += 1
        if self.keep_files > 0:
            doomed = [*existing, target][: -self.keep_files]
            for old in doomed:
                old.unlink(missing_ok=True)
            if doomed:
                fsync_dir(self.path.parent)


# -- verification --------------------------------------------------------------------------------------

_EDITED = "hash mismatch (record edited)"
_BROKEN_LINK = "prev does not match the previous record (record deleted, inserted or reordered)"
_GAP = "sequence gap"


@dataclass
class _Walk:
    """Where verification stands: the last intact record so far."""

    prev_digest: str | None = None
    prev_seq: int = FIRST_SEQ - 1
    records: int = 0
    anchored: bool = False
    note: str | None = None


def _check_line(raw: bytes, path: Path, walk: _Walk) -> tuple[str, Any] | None:
    """(reason, seq) for a bad record; None after advancing `walk` past a good one."""
    if not raw.endswith(b"\n"):
        return "truncated last line", None
    line = raw[:-1]
    try:
        rec = json.loads(line)
    except ValueError:
        return "not valid JSON", None
    if not isinstance(rec, dict):
        return "not a JSON object", None
    seq, prev, digest = rec.get("seq"), rec.get("prev"), rec.get("hash")
    if (not isinstance(seq, int) or isinstance(seq, bool) or not isinstance(prev, str)
            or not isinstance(digest, str)):
        return "malformed record (seq, prev or hash missing)", seq
    try:
        if _sha256(_canonical({k: v for k, v in rec.items() if k != "hash"})) != digest:
            return _EDITED, seq
        canonical = _canonical(rec) == line
    except ValueError:
        canonical = False
    if not canonical:
        # Same content, other bytes: the next record's prev no longer matches this line.
        return "record not in canonical form (record edited)", seq
    if walk.prev_digest is None:
        if prev != GENESIS_PREV:
            walk.anchored = True
            walk.note = (f"the oldest record (seq {seq} in {path}) is not the genesis record: older files "
                         f"are missing (pruned by keep_files?), so its prev is taken as the anchor and "
                         f"nothing before it is vouched for")
        elif seq != FIRST_SEQ:
            return f"{_GAP} (the genesis record must have seq {FIRST_SEQ})", seq
    else:
        if prev != walk.prev_digest:
            return _BROKEN_LINK, seq
        if seq != walk.prev_seq + 1:
            return f"{_GAP} (expected seq {walk.prev_seq + 1})", seq
    walk.prev_digest = _sha256(line)
    walk.prev_seq = seq
    walk.records += 1
    return None


def verify(paths: Sequence[Path]) -> VerifyResult:
    """Checks that `paths`, oldest first, form one unbroken chain, and names the first record that does not.

    If the oldest record is not the genesis record (older files were pruned), its prev is accepted as the
    anchor and the result says so: records before it cannot be vouched for.
    """
    walk = _Walk()
    files = 0
    for path in paths:
        files += 1
        lineno = 0
        problem: tuple[str, Any] | None = None
        try:
            with Path(path).open("rb") as f:
                for raw in f:
                    lineno += 1
                    problem = _check_line(raw, Path(path), walk)
                    if problem is not None:
                        break
        except OSError as exc:
            problem = (f"unreadable: {exc.strerror or exc}", None)
        if problem is not None:
            reason, seq = problem
            return VerifyResult(
                ok=False, records=walk.records, files=files, first_bad_file=str(path),
                first_bad_line=lineno or None,
                first_bad_seq=seq if isinstance(seq, int) and not isinstance(seq, bool) else None,
                reason=reason, anchored=walk.anchored, note=walk.note,
                last_seq=walk.prev_seq if walk.prev_digest is not None else None, head=walk.prev_digest)
    return VerifyResult(ok=True, records=walk.records, files=files, anchored=walk.anchored, note=walk.note,
                        last_seq=walk.prev_seq if walk.prev_digest is not None else None,
                        head=walk.prev_digest)


def verify_chain_files(path: Path) -> VerifyResult:
    """Verifies `path` together with its rotated siblings, oldest first."""
    return verify(chain_files(Path(path)))
