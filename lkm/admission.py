"""Admission control for private-key operations: answer 503 early instead of queueing past the deadline.

Every unwrap needs a worker thread for its private-key operation. When callers send more than the workers can
do, the workers' queue grows and so does everyone's latency, without bound; a caller with a 250 ms timeout
then gives up on answers that still cost a full RSA operation each. So a request is admitted only if its
operations can be expected to start within `limits.request_deadline_ms`:

    expected wait = max(0, queued + running - workers + 1) / workers * mean operation time

The mean is a moving average of what the operations really took, so the bound follows the key store (software
RSA, an HSM, a slower machine) without tuning. The estimate can be wrong (a burst, a slow HSM call), so a job
also checks when it starts: if its request already waited past the deadline, it is dropped unrun. Refusals are
`Unavailable` (503, code `overloaded`, `Retry-After`) and are counted by listener.

Inline execution (no pool): the operation runs on the event loop's own thread, as soon as its request's handler
reaches it. A server that runs one process per core gains nothing from worker threads (the kernel spreads the
connections over the processes, each with its core) and saves what a hand-off costs both threads: a queue, a
wake-up through the loop's self-pipe, a context switch each way; measured, that was a quarter of the CPU of an
unwrap. The loop is then busy for one operation at a time (under a millisecond for RSA-3072), and the same
deadline rule holds: every handler that is ready registers (its operation counts as outstanding, one at a
time) before the first of them runs its operation, and one that would start its operation after the deadline
is refused with the same 503 instead.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from lkm.config import RsaExecution
from lkm.errors import Unavailable
from lkm.workers import WorkerThreads

T = TypeVar("T")

INITIAL_OPERATION_SECONDS = 0.003
"""The guess before the first operation finished: an RSA-3072 decrypt in software on a slow core."""
SMOOTHING = 0.05
"""Weight of the newest sample in the moving average: about the last 20 operations count."""
RETRY_AFTER_SECONDS = 1


def overloaded() -> Unavailable:
    return Unavailable("server overloaded; retry shortly", code="overloaded", retry_after=RETRY_AFTER_SECONDS)


def runs_inline(mode: RsaExecution, *, in_process_store: bool, processes: int, cpus: int) -> bool:
    """Whether private-key operations run on the event loop (see the module's doc).

    Automatic: inline when the key store computes in this process (file, PostgreSQL: software RSA) and the
    server runs at least one process per CPU it may use. A PKCS#11 token computes elsewhere and an operation
    waits on it: there the worker threads keep several sessions busy while the loop goes on.
    """
    if mode is RsaExecution.AUTO:
        return in_process_store and processes >= cpus
    return mode is RsaExecution.INLINE


def is_shed(error: BaseException | None) -> bool:
    return isinstance(error, Unavailable) and error.code == "overloaded"


class _Late(Exception):
    """Raised inside a worker for a job whose request waited past the deadline before the job could start."""


class Admission:
    """Wraps the worker pool for private-key operations; one instance per server.

    `on_shed(route)` is called on the event loop for every refused request (route as in RequestContext).
    """

    def __init__(self, pool: WorkerThreads | None, *, deadline_seconds: float, workers: int | None = None,
                 on_shed: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        """`pool` None: operations run inline, on the event loop. `workers`: how many operations run at once,
        for the estimate (default: the pool's threads; 1 inline)."""
        workers = (1 if pool is None else pool.count) if workers is None else workers
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self.pool = pool
        self.workers = workers
        self.deadline = deadline_seconds
        self.on_shed = on_shed
        self.clock = clock
        self.outstanding = 0  # operations admitted and not finished; changed on the event loop only
        self.operation_seconds = INITIAL_OPERATION_SECONDS
        self.shed_count = 0
        self._awaited = asyncio.Semaphore(workers)  # see run_awaited

    def expected_wait(self) -> float:
        """Seconds a newly admitted operation would wait for a worker."""
        ahead = self.outstanding - self.workers + 1
        return 0.0 if ahead <= 0 else ahead * self.operation_seconds / self.workers

    def observe(self, operations: int, seconds: float) -> None:
        """Feeds the moving average; called from worker threads (a lost update under a race is harmless)."""
        if operations > 0:
            self.operation_seconds += SMOOTHING * (seconds / operations - self.operation_seconds)

    def _shed(self, route: str) -> Unavailable:
        self.shed_count += 1
        if self.on_shed is not None:
            self.on_shed(route)
        return overloaded()

    async def run(self, route: str, started: float, operations: int, func: Callable[..., T], *args: object) -> T:
        """Runs `func(*args)` (which performs `operations` private-key operations) on a worker, or refuses.

        `started` is when the request reached the service (`clock()` time): the deadline counts from there.
        """
        self._admit(route, started)
        self.outstanding += operations
        try:
            if self.pool is None:
                # Inline: first let every handler that is ready now reach this point (one trip round the loop,
                # no thread involved), so that each one's arrival counts in `outstanding` and its deadline runs
                # from before the operations queued ahead of it; then the operation, on this thread.
                await asyncio.sleep(0)
                return self._run_now(started, operations, func, *args)
            return await self.pool.run(self._run_now, started, operations, func, *args)
        except _Late:
            raise self._shed(route) from None
        finally:
            self.outstanding -= operations

    async def run_awaited(self, route: str, started: float, operations: int,
                          func: Callable[[], Awaitable[T]]) -> T:
        """As run(), for operations the event loop awaits (a store that StartsDecrypts): at most `workers` at
        once, the others waiting in arrival order, and one that could start only past the deadline is refused."""
        self._admit(route, started)
        self.outstanding += operations
        try:
            async with self._awaited:
                begin = self._begin(started)
                try:
                    return await func()
                finally:
                    self.observe(operations, self.clock() - begin)
        except _Late:
            raise self._shed(route) from None
        finally:
            self.outstanding -= operations

    async def run_chunks(self, route: str, started: float,
                         chunks: Sequence[tuple[int, Callable[[], T]]]) -> list[T | Unavailable]:
        """Runs independent jobs (a batch split across workers) admitted as one request.

        The whole request is refused, or admitted whole; a chunk that still could not start in time comes back
        as the `Unavailable` it would have raised, so the caller can fail just those items.
        """
        self._admit(route, started)
        total = sum(operations for operations, _ in chunks)
        self.outstanding += total
        try:
            if self.pool is None:  # inline as in run(): one trip round the loop, then the chunks in order
                await asyncio.sleep(0)
                outcomes: list[T | BaseException] = [self._run_or_late(started, operations, func)
                                                     for operations, func in chunks]
            else:
                outcomes = await asyncio.gather(*(self.pool.run(self._run_now, started, operations, func)
                                                  for operations, func in chunks), return_exceptions=True)
        finally:
            self.outstanding -= total
        results: list[T | Unavailable] = []
        late = False
        for outcome in outcomes:
            if isinstance(outcome, _Late):
                late = True
                results.append(overloaded())
            elif isinstance(outcome, BaseException):
                raise outcome
            else:
                results.append(outcome)
        if late:
            self._shed(route)
        return results

    def _admit(self, route: str, started: float) -> None:
        if self.clock() - started + self.expected_wait() > self.deadline:
            raise self._shed(route)

    def _begin(self, started: float) -> float:
        """When an admitted operation starts; _Late (dropped unrun) if its request already waited past the
        deadline."""
        begin = self.clock()
        if begin > started + self.deadline:
            raise _Late()
        return begin

    def _run_or_late(self, started: float, operations: int, func: Callable[[], T]) -> T | _Late:
        """A chunk inline: its result, or the _Late it raised (the other chunks still run)."""
        try:
            return self._run_now(started, operations, func)
        except _Late as late:
            return late

    def _run_now(self, started: float, operations: int, func: Callable[..., T], *args: object) -> T:
        """The operation on the calling thread, unless its request is already past the deadline (_Late); its
        time feeds the moving average."""
        begin = self._begin(started)
        try:
            return func(*args)
        finally:
            self.observe(operations, self.clock() - begin)
