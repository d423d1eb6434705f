"""The audit log the server and the CLI write through: group commit on top of the durable chain append.

Why group commit: an fsync costs milliseconds, and one per request would cap the server's throughput. Records
that arrive while a write is in flight are written together with one write() and one fsync(); each caller
returns only once its own line is durable.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from lkm.audit.appender import ChainAppender
from lkm.audit.files import utc_now
from lkm.audit.record import PreparedEvent, prepare
from lkm.errors import AuditWriteError
from lkm.workers import WorkerThreads

__all__ = ["AuditLog"]


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


class AuditLog(ChainAppender):
    """An append-only, hash-chained, size-rotated audit file shared by every lkm process on the host.

    `record()` (server) and `record_sync()` (CLI) return only once the record is fsynced, and raise
    AuditWriteError otherwise. `fail_closed` is carried for the server, which decides what a failure means.
    The hooks run as ChainAppender says: on the audit writer thread or on record_sync's caller.
    """

    def __init__(self, path: Path, *, max_bytes: int = 0, keep_files: int = 0, fail_closed: bool = True,
                 on_failure: Callable[[], None] | None = None,
                 on_written: Callable[[int], None] | None = None,
                 clock: Callable[[], datetime] = utc_now) -> None:
        super().__init__(path, max_bytes=max_bytes, keep_files=keep_files, on_failure=on_failure,
                         on_written=on_written, clock=clock)
        self.fail_closed = fail_closed
        self._pending: list[tuple[PreparedEvent, asyncio.Future[None]]] = []
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
            self.close_files()

    async def __aenter__(self) -> AuditLog:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def record(self, event: Mapping[str, Any]) -> None:
        """Returns once the record is durable; raises AuditWriteError if it could not be made so."""
        body = prepare(event)
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
                    await self._thread.run(self.append, [body for body, _ in batch])
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
        self.append([prepare(event)], keep_open=False)
