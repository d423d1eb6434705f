"""The durable append: seal records onto the chain's end and fsync them, one writer at a time on the host.

Why the lock and the head cache: the server and the CLI append to the same file. Every append holds an
exclusive flock on `<path>.lock`, so exactly one writer at a time reads the chain head, appends and fsyncs.
A process re-reads the head only when the file is not as it left it, so a lone server never re-reads.

Why an append can be split in two: the server's event loop seals and writes a batch itself when nothing would
make it wait (`write_without_waiting`), and only the fsync is left to a thread (`finish_written`), which then
releases the locks. A thread that does the whole append takes the GIL back after every system call it makes,
each time behind the loop; measured on one core, that hand-off cost more CPU per unwrap than the sealing itself.
Both locks stay held from the write to the end of the fsync, so no other writer ever chains onto records that
are not yet durable, and a failed fsync can still be taken back.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import json
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal

from lkm.audit.files import last_line, rotate, rotated_files, utc_now
from lkm.audit.record import GENESIS, Head, PreparedEvent, seal, sha256_hex
from lkm.errors import AuditWriteError
from lkm.fsutil import fsync_dir, write_all

__all__ = ["ChainAppender", "ChainBusy", "WrittenBatch"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class WrittenBatch:
    """A batch written but not yet durable. Until `finish_written` ends it, its writer holds both locks."""

    fd: int
    lock_fd: int
    size_before: int
    head: Head  # the chain's end once the batch is durable
    records: int


class ChainBusy(enum.Enum):
    """What `write_without_waiting` gives back when another writer holds the chain: nothing was written."""

    LOCKED = "another writer holds the chain"


class _MustWait(Exception):
    """The append needs work that may block (a torn tail to repair, a rotation, a new file): the thread does it."""


class ChainAppender:
    """Appends prepared events to a hash-chained, size-rotated file shared by every lkm process on the host.

    `on_failure` runs on the thread that saw the failure and `on_written(n)` on the thread that made n records
    durable, so both must be thread-safe and quick, e.g. a metrics counter. `clock` names rotated files.
    """

    def __init__(self, path: Path, *, max_bytes: int = 0, keep_files: int = 0,
                 on_failure: Callable[[], None] | None = None,
                 on_written: Callable[[int], None] | None = None,
                 clock: Callable[[], datetime] = utc_now) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.max_bytes = max_bytes  # 0: never rotate
        self.keep_files = keep_files  # rotated files kept; 0: keep all
        self.on_failure = on_failure
        self.on_written = on_written
        self.clock = clock
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
        self._head: Head | None = None
        self._state: tuple[int, int, int, int] | None = None  # (dev, inode, size, mtime_ns) after our write
        self._fd = -1  # the current audit file, kept open between the server's appends
        self._lock_fd = -1  # the lock file, likewise

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

    def append(self, bodies: Sequence[PreparedEvent], *, keep_open: bool = True) -> None:
        """Seals and writes `bodies` as one durable append, under both locks; AuditWriteError on failure.

        The server keeps the lock file and the current audit file open between appends (`keep_open`): an
        append is then flock, stat, write, fsync, fstat and unlock, and each system call saved is one less time
        the writer thread gives up the GIL and must win it back from the event loop and the workers.
        """
        with self._io_lock:
            try:
                lock_fd = self._lock_fd if self._lock_fd >= 0 else self._open_lock()
                fcntl.flock(lock_fd, fcntl.LOCK_EX)
                try:
                    lines, head = _seal_all(bodies, self._current_head())
                    self._write_lines(lines)
                    self._head = head
                finally:
                    fcntl.flock(lock_fd, fcntl.LOCK_UN)
            except Exception as exc:
                failure = self._failed(exc)
                if failure is exc:
                    raise
                raise failure from exc
            finally:
                if not keep_open:
                    self._close_files()
        self._count_written(len(bodies))

    def write_without_waiting(self, bodies: Sequence[PreparedEvent]) -> WrittenBatch | ChainBusy | None:
        """Seals and writes `bodies` (no fsync) if that needs no wait: both locks free, the head known or readable,
        the file neither new nor due to rotate. Otherwise, and on any error, it leaves the file as it was and
        returns ChainBusy.LOCKED when another writer (another process) holds the chain, which it soon gives
        back, else None; the caller may try again, or hand the batch to `append`, which waits, repairs and
        reports failures. On success the locks stay held: the caller must pass the batch to `finish_written`.
        """
        if not self._io_lock.acquire(blocking=False):
            return None
        written = False
        size = 0
        try:
            lock_fd = self._lock_fd if self._lock_fd >= 0 else self._open_lock()
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # another writer holds the chain
                self._io_lock.release()
                return ChainBusy.LOCKED
            head = self._current_head(torn="wait")
            fd, size = self._current_file()
            if size == 0:
                raise _MustWait  # a new file: its directory entry must be made durable too
            lines, head = _seal_all(bodies, head)
            data = b"".join(lines)
            if 0 < self.max_bytes < size + len(data):
                raise _MustWait
            written = True
            write_all(fd, data)
            return WrittenBatch(fd, lock_fd, size, head, len(bodies))
        except _MustWait:  # nothing written, and what is cached still holds
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            self._io_lock.release()
            return None
        except Exception as exc:
            log.debug("audit append to %s left to the writer thread: %s", self.path, exc)
            if written:  # take back what part of the batch reached the file
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, size)
            self._forget()  # closing the lock file releases the flock too
            self._io_lock.release()
            return None

    def finish_written(self, batch: WrittenBatch) -> None:
        """Makes a batch from `write_without_waiting` durable, then releases its locks; on failure the batch is
        taken back and AuditWriteError raised. Runs on a thread that may block."""
        try:
            try:
                os.fsync(batch.fd)
                self.fsync_count += 1
                st = os.fstat(batch.fd)
            except Exception as exc:
                with contextlib.suppress(OSError):
                    os.ftruncate(batch.fd, batch.size_before)
                raise self._failed(exc) from exc  # the lock goes with its file
            self._state = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            self._head = batch.head
            fcntl.flock(batch.lock_fd, fcntl.LOCK_UN)
        finally:
            self._io_lock.release()
        self._count_written(batch.records)

    def _forget(self) -> None:
        """What is on disk is unknown now: the next append reads the head afresh, from files it opens again.
        Closing the lock file releases its flock."""
        self._head = None
        self._state = None
        self._close_files()

    def _failed(self, exc: BaseException) -> AuditWriteError:
        """A failed append, forgotten and reported: the error its caller raises."""
        self._forget()
        self._note_failure(exc)
        if isinstance(exc, AuditWriteError):
            return exc
        return AuditWriteError(f"audit write to {self.path} failed: {exc}")

    def _count_written(self, records: int) -> None:
        self.healthy = True
        self.batch_count += 1
        self.records_written += records
        if self.on_written is not None:
            self.on_written(records)

    def close_files(self) -> None:
        """Closes the files kept open between appends; the next append reopens them."""
        with self._io_lock:
            self._close_files()

    def _open_lock(self) -> int:
        self._lock_fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        return self._lock_fd

    def _close_files(self) -> None:
        for fd in (self._lock_fd, self._fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._lock_fd = self._fd = -1

    def _current_head(self, *, torn: Literal["repair", "wait"] = "repair") -> Head:
        """The chain's end, re-read if another writer changed the file; a torn tail is repaired, or with
        `torn="wait"` (the loop, which must not fsync) left to the thread: _MustWait."""
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
        head = self._read_head(st, torn=torn)
        if st is not None and torn == "wait":
            # Nothing was repaired, so the file is as `st` saw it: if the append must go to the thread after
            # all, the thread need not read the head again.
            self._head = head
            self._state = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        return head

    def _read_head(self, st: os.stat_result | None, *, torn: Literal["repair", "wait"]) -> Head:
        if st is not None and st.st_size > 0:
            head = self._head_of(self.path, torn=torn)
            if head is not None:
                return head
        for older in reversed(rotated_files(self.path)):
            head = self._head_of(older, torn="ignore")
            if head is not None:
                return head
        return GENESIS

    def _head_of(self, path: Path, *, torn: Literal["repair", "wait", "ignore"]) -> Head | None:
        line, complete, size = last_line(path)
        if complete < size and torn == "wait":
            raise _MustWait
        if complete < size and torn == "repair":
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
        return Head(seq, sha256_hex(line))

    def _open_current(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def _current_file(self) -> tuple[int, int]:
        """The current audit file, open, and its size; after `_current_head`, under both locks."""
        if self._fd >= 0:  # kept open only while _state describes it (_current_head closes it otherwise)
            assert self._state is not None
            return self._fd, self._state[2]
        self._fd = self._open_current()
        return self._fd, os.fstat(self._fd).st_size

    def _write_lines(self, lines: list[bytes]) -> None:
        fd, size = self._current_file()
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
                rotate(self.path, keep_files=self.keep_files, clock=self.clock)
                self.rotations += 1
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
            write_all(fd, data)
            os.fsync(fd)
        except OSError:
            # Take back a partial write, so the file never holds a torn line (best effort: the next
            # writer repairs a torn tail too).
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size_before)
            raise
        self.fsync_count += 1


def _seal_all(bodies: Sequence[PreparedEvent], head: Head) -> tuple[list[bytes], Head]:
    """The lines of `bodies` chained after `head`, and the head they leave."""
    lines: list[bytes] = []
    for body in bodies:
        line, head = seal(body, head)
        lines.append(line)
    return lines, head
