"""The audit log the server and the CLI write through: group commit on top of the durable chain append.

Why group commit: an fsync costs milliseconds, and one per request would cap the server's throughput. Records
that arrive while a write is in flight are written together with one write() and one fsync(); each caller
returns only once its own line is durable.

Why the loop seals and writes and a thread only fsyncs: the batch is put together where its records arrive, on
the event loop, and written with one write() into the page cache when that cannot wait (lkm.audit.appender:
both locks free, no rotation due). The thread is handed the batch with its locks held, fsyncs it, releases the
locks, and resumes the batch's callers with one call into the loop. A thread that sealed and wrote as well took
the GIL back, behind the loop, after each of its system calls: measured on one core, moving that work to the
loop cut the audit trail's CPU per unwrap by about 17 µs. Whatever would wait (a rotation, a torn tail to
repair, an error) goes to the thread as the whole append, as the CLI does it. So does a chain another process
holds, but only after the loop has tried again for `CHAIN_BUSY_SECONDS`: the other process holds it for its
fsync, a few hundred µs, and with two worker processes one batch in seven found it held. Waiting on the loop
costs a timer and a flock call per try, and the batch gathers what comes meanwhile; the thread would wait as
long, then seal and write as well, at about three times the CPU of a batch the loop wrote.

On a busy server the log also lingers: when its previous write carried several records or records were already
waiting as it finished, it waits up to `LINGER_SECONDS` (or until `LINGER_RECORDS` are pending) before the next
write, so that more records share each fsync. An fsync costs about 90 µs of CPU whatever it carries; measured
on the platform route, about one record per fsync was an eighth of the server's CPU per unwrap. An idle server
never lingers: its first record is written at once.

It stops lingering once no more records can come: the loop that sends them has run out of work
(`loop_idle()`, called by `lkm.idleloop`) and nothing that ends in a record is under way (`records_coming`:
the server passes "private-key operations admitted and not finished"). Waiting on then gains no record and
holds every caller in flight, and with them a closed-loop caller's next requests: with 8 connections on a
process, a fixed 10 ms linger held each round of 8 unwraps (8 ms of RSA) for 10 ms, a third of its time. It
writes at once then, with no grace for requests still on the wire: with the batch written on the loop, a 1 ms
grace left each of two workers idle for it after nearly every batch, 11% of their throughput, and saved no CPU.
Without an idle signal (another loop, or none) the log lingers as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from lkm.audit.appender import ChainAppender, ChainBusy, WrittenBatch
from lkm.audit.files import utc_now
from lkm.audit.record import PreparedEvent, prepare
from lkm.background import run_below_the_loop
from lkm.errors import AuditWriteError
from lkm.threadnames import name_this_thread

__all__ = ["LINGER_RECORDS", "LINGER_SECONDS", "AuditLog"]

LINGER_SECONDS = 0.010
"""How long a busy writer waits for more records to join its next write (the latency a record may gain).

With the RSA operation inline, one core answers about one request a millisecond. An append costs about 100 µs
of CPU for its fsync and 10 µs per record, so the records per write set the audit writer's CPU per unwrap:
measured on one core at peak, 91-96 µs with 5 ms, 60-70 µs with 10 ms, 47-57 µs with 20 ms. 10 ms takes most
of that saving while a request's added wait stays a small part of the 50 ms p99 budget."""
LINGER_RECORDS = 16
"""A batch this large is written at once, without waiting out the linger."""

CHAIN_BUSY_RETRY_SECONDS = 0.00025
CHAIN_BUSY_SECONDS = 0.003
"""While another process holds the chain (for its batch's fsync, a few hundred µs), the loop tries again this
often, for this long, before the writer thread takes the batch and waits for the lock itself."""


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


@dataclass(frozen=True, slots=True)
class _Job:
    """A batch for the writer thread: to fsync (`written`, the loop wrote it) or to append whole."""

    batch: list[tuple[PreparedEvent, asyncio.Future[None]]]
    written: WrittenBatch | None


class AuditLog(ChainAppender):
    """An append-only, hash-chained, size-rotated audit file shared by every lkm process on the host.

    `record()` (server) and `record_sync()` (CLI) return only once the record is fsynced, and raise
    AuditWriteError otherwise. `record()` is for the one event loop the log was started on. `fail_closed` is
    carried for the server, which decides what a failure means. The hooks run as ChainAppender says: on the
    audit writer thread or on record_sync's caller.
    """

    def __init__(self, path: Path, *, max_bytes: int = 0, keep_files: int = 0, fail_closed: bool = True,
                 on_failure: Callable[[], None] | None = None,
                 on_written: Callable[[int], None] | None = None,
                 clock: Callable[[], datetime] = utc_now,
                 records_coming: Callable[[], bool] = lambda: True,
                 linger_seconds: float = LINGER_SECONDS) -> None:
        """`records_coming()`: whether more records are expected soon (read on the loop; a stale answer costs
        at most one linger)."""
        super().__init__(path, max_bytes=max_bytes, keep_files=keep_files, on_failure=on_failure,
                         on_written=on_written, clock=clock)
        self.fail_closed = fail_closed
        self._records_coming = records_coming
        self._linger_seconds = linger_seconds
        # Everything below is the loop's own, touched on its thread only.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0  # the thread the loop runs on
        self._pending: list[tuple[PreparedEvent, asyncio.Future[None]]] = []
        self._in_flight = False  # a batch is with the writer thread; the next waits for it
        self._busy = False  # the last write carried several records, or records waited as it finished
        self._linger: asyncio.TimerHandle | None = None  # ends the current linger, or tries a busy chain again
        self._busy_since: float | None = None  # loop time the chain was first found busy, for the pending batch
        self._flushed: list[asyncio.Future[None]] = []  # close() waiting for the last batch
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
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
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        # A thread of its own: audit fsyncs must neither block the loop nor queue behind other blocking work.
        self._thread = threading.Thread(target=self._write_loop, name="lkm-audit", daemon=True)
        self._thread.start()

    async def close(self) -> None:
        """Writes what is pending, then stops the writer; later record() calls fail."""
        self._closing = True
        try:
            if self._loop is asyncio.get_running_loop():
                while self._pending or self._in_flight:
                    self._commit()
                    flushed = self._loop.create_future()
                    self._flushed.append(flushed)
                    await flushed
        finally:
            thread, self._thread = self._thread, None
            try:
                if thread is not None:
                    self._jobs.put(None)
                    await asyncio.to_thread(thread.join)
            finally:
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
        if self._thread is None:
            await self.start()
        loop = self._loop
        # The loop it started on, running here: asyncio.get_running_loop() would cost a getpid() system call.
        if loop is None or threading.get_ident() != self._loop_thread or not loop.is_running():
            raise AuditWriteError("audit log records come from the event loop it was started on")
        future: asyncio.Future[None] = loop.create_future()
        self._pending.append((body, future))
        if not self._in_flight:  # otherwise the batch in flight, once done, decides when this one goes
            self._next_batch()
        await future

    def loop_idle(self) -> None:
        """On the recording loop's thread, when it has nothing left to run: a lingering batch with nothing more
        on its way is written now."""
        if self._linger is not None and not self._records_coming():
            self._commit()

    def _next_batch(self) -> None:
        """On the loop, with records pending and none in flight: writes them now, or lingers for more."""
        if not self._busy or self._closing or len(self._pending) >= LINGER_RECORDS:
            self._commit()
        elif self._linger is None:
            assert self._loop is not None
            self._linger = self._loop.call_later(self._linger_seconds, self._commit)

    def _commit(self) -> None:
        """On the loop: sends what is pending as one batch, written here if that cannot wait."""
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        if self._in_flight or not self._pending:
            return
        written = self.write_without_waiting([body for body, _ in self._pending])
        if written is ChainBusy.LOCKED:  # another process's fsync: wait for it here a while (module docstring)
            assert self._loop is not None
            now = self._loop.time()
            if self._busy_since is None:
                self._busy_since = now
            if not self._closing and now - self._busy_since < CHAIN_BUSY_SECONDS:
                self._linger = self._loop.call_later(CHAIN_BUSY_RETRY_SECONDS, self._commit)
                return
            written = None
        self._busy_since = None
        batch, self._pending = self._pending, []
        self._in_flight = True
        self._jobs.put(_Job(batch, written))

    def _write_loop(self) -> None:
        """The writer thread: fsyncs the batches the loop wrote and appends the rest; the callers of a batch
        are resumed with one call into their loop."""
        name_this_thread()
        run_below_the_loop()
        while (job := self._jobs.get()) is not None:
            error: BaseException | None = None
            try:
                if job.written is not None:
                    self.finish_written(job.written)
                else:
                    self.append([body for body, _ in job.batch])
            except Exception as exc:
                error = exc
            assert self._loop is not None
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits for these any more
                self._loop.call_soon_threadsafe(self._done, job.batch, error)
            del job

    def _done(self, batch: list[tuple[PreparedEvent, asyncio.Future[None]]], error: BaseException | None) -> None:
        """On the loop: the callers of a batch learn its fate; what piled up meanwhile goes next."""
        _settle([future for _, future in batch], error)
        self._in_flight = False
        self._busy = len(batch) > 1 or bool(self._pending)
        if self._pending:
            self._next_batch()
        else:
            flushed, self._flushed = self._flushed, []
            for waiter in flushed:
                if not waiter.done():
                    waiter.set_result(None)

    # -- synchronous, for the CLI ----------------------------------------------------------------------

    def record_sync(self, event: Mapping[str, Any]) -> None:
        """Appends one record and fsyncs before returning; raises AuditWriteError on failure."""
        self.append([prepare(event)], keep_open=False)


def _settle(futures: list[asyncio.Future[None]], error: BaseException | None) -> None:
    """On the callers' loop: each caller of a batch learns its record is durable, or why it is not."""
    for future in futures:
        if future.done():  # its caller was cancelled; the record is written all the same
            continue
        if error is None:
            future.set_result(None)
        else:
            failure = AuditWriteError(str(error))
            failure.__cause__ = error
            future.set_exception(failure)
