"""The audit log the server and the CLI write through: group commit on top of the durable chain append.

Why group commit: an fsync costs milliseconds, and one per request would cap the server's throughput. Records
that arrive while a write is in flight are written together with one write() and one fsync(); each caller
returns only once its own line is durable.

The hand-off is built for a loop that must not wait: a record is a list append under a lock the writer holds
only to swap the list; the writer thread is woken only when it is idle (while it writes, records pile up for its
next batch), and a batch's callers are resumed with one call into their event loop. On a busy server that is
well under one cross-thread wake-up per record in each direction.

On a busy server the writer also lingers: when its previous write carried several records or records were
already waiting as it finished, it waits up to `LINGER_SECONDS` (or until `LINGER_RECORDS` are pending) before
the next write, so that more records share each fsync. An fsync costs about 90 µs of CPU whatever it carries;
measured on the platform route, about one record per fsync was an eighth of the server's CPU per unwrap. An idle
server never lingers: its first record is written at once.

It stops lingering once no more records can come: the loop that sends them has run out of work
(`loop_idle()`, called by `lkm.idleloop`) and nothing that ends in a record is under way (`records_coming`:
the server passes "private-key operations admitted and not finished"). Waiting on then gains no record and
holds every caller in flight, and with them a closed-loop caller's next requests: with 8 connections on a
process, a fixed 10 ms linger held each round of 8 unwraps (8 ms of RSA) for 10 ms, a third of its time.
Without an idle signal (another loop, or none) the writer lingers as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from lkm.audit.appender import ChainAppender
from lkm.audit.files import utc_now
from lkm.audit.record import PreparedEvent, prepare
from lkm.background import run_below_the_loop
from lkm.errors import AuditWriteError
from lkm.threadnames import name_this_thread

__all__ = ["IDLE_GRACE_SECONDS", "LINGER_RECORDS", "LINGER_SECONDS", "AuditLog"]

LINGER_SECONDS = 0.010
"""How long a busy writer waits for more records to join its next write (the latency a record may gain).

With the RSA operation inline, one core answers about one request a millisecond. An append costs about 100 µs
of CPU for its fsync and 10 µs per record, so the records per write set the audit writer's CPU per unwrap:
measured on one core at peak, 91-96 µs with 5 ms, 60-70 µs with 10 ms, 47-57 µs with 20 ms. 10 ms takes most
of that saving while a request's added wait stays a small part of the 50 ms p99 budget."""
LINGER_RECORDS = 16
"""A batch this large is written at once, without waiting out the linger."""
IDLE_GRACE_SECONDS = 0.001
"""How long a lingering writer still waits once the loop ran out of work and nothing is under way: a closed-loop
caller's next request, sent as the previous answer arrived, is on the wire for a fraction of that."""


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
                 clock: Callable[[], datetime] = utc_now,
                 records_coming: Callable[[], bool] = lambda: True,
                 linger_seconds: float = LINGER_SECONDS) -> None:
        """`records_coming()`: whether more records are expected soon (read on the writer thread and in
        record(); a stale answer costs at most one linger)."""
        super().__init__(path, max_bytes=max_bytes, keep_files=keep_files, on_failure=on_failure,
                         on_written=on_written, clock=clock)
        self.fail_closed = fail_closed
        self._records_coming = records_coming
        self._linger_seconds = linger_seconds
        self._drained_at: float | None = None  # when the loop ran out of work, since the last record
        self._pending: list[tuple[PreparedEvent, asyncio.Future[None]]] = []
        self._cond = threading.Condition()  # guards _pending, _idle and _closing
        self._idle = False  # the writer waits for records: the next one must wake it
        self._lingering = False  # the writer waits for more records to join a batch: a full batch wakes it
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
        # A thread of its own: audit fsyncs must neither block the loop nor queue behind other blocking work.
        self._thread = threading.Thread(target=self._write_loop, name="lkm-audit", daemon=True)
        self._thread.start()

    async def close(self) -> None:
        """Writes what is pending, then stops the writer; later record() calls fail."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        thread, self._thread = self._thread, None
        try:
            if thread is not None:
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
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        with self._cond:
            pending = self._pending
            pending.append((body, future))
            self._drained_at = None
            # A busy writer takes it with the rest of the next batch: no wake-up per record.
            if self._idle or (self._lingering and len(pending) >= LINGER_RECORDS):
                self._cond.notify()
        await future

    def loop_idle(self) -> None:
        """On the recording loop's thread, when it has nothing left to run: a lingering writer with nothing
        more on its way writes now."""
        with self._cond:
            if self._drained_at is None:
                self._drained_at = time.monotonic()
            # Woken only when its wait may end: while an operation is under way its record is awaited anyway.
            if self._lingering and not self._records_coming():
                self._cond.notify()

    def _write_loop(self) -> None:
        """The writer thread: everything that queued while the previous write was in flight goes out in one
        write and one fsync; the callers of a batch are resumed with one call into their event loop."""
        name_this_thread()
        run_below_the_loop()
        busy = False  # the previous write carried several records, or records waited as it finished
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._idle = True
                    self._cond.wait()
                self._idle = False
                if busy and not self._closing:
                    self._linger()
                if not self._pending:
                    return
                batch, self._pending = self._pending, []
            written = len(batch)
            error: BaseException | None = None
            try:
                self.append([body for body, _ in batch])
            except Exception as exc:
                error = exc
            by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
            for _, future in batch:
                by_loop.setdefault(future.get_loop(), []).append(future)
            for loop, futures in by_loop.items():
                with contextlib.suppress(RuntimeError):  # that loop closed: nobody waits for these any more
                    loop.call_soon_threadsafe(_settle, futures, error)
            del batch, by_loop
            with self._cond:
                busy = written > 1 or bool(self._pending)

    def _linger(self) -> None:
        """Under `_cond`: waits while the next batch is not full and more records may still join it."""
        self._lingering = True
        try:
            until = time.monotonic() + self._linger_seconds
            while not self._closing and len(self._pending) < LINGER_RECORDS:
                now = time.monotonic()
                wait = until - now
                drained_at = self._drained_at
                if drained_at is not None and not self._records_coming():
                    # The loop is out of work and nothing is under way: only requests already on the wire can
                    # still add a record, and they reach the loop within the grace.
                    wait = min(wait, drained_at + IDLE_GRACE_SECONDS - now)
                if wait <= 0:
                    return
                self._cond.wait(wait)
        finally:
            self._lingering = False

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
