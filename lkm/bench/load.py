"""The load run: `concurrency` workers, each with its own connection, for a duration or a number of requests.

Closed loop by default (each worker sends its next request when the previous answer arrives: the peak rate).
With a rate, requests are scheduled at fixed intervals and latency counts from the scheduled time, so a server
that falls behind is charged for the wait (no coordinated omission). A warm-up phase opens the connections and
warms the server's caches; then every answer that arrives between the two snapshots of the server's CPU counts,
sent before the first or not (see `_Run._counting`).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from lkm.bench.cpu import CpuSnapshot, CpuUsage, combined_usage, cpus_allowed, snapshot, usage
from lkm.bench.http import Connection, ResumingContext
from lkm.bench.requests import RequestSource
from lkm.errors import ProtocolError


@dataclass(frozen=True)
class LoadPlan:
    concurrency: int = 8
    duration: float | None = 10.0  # seconds of measurement; None with `requests`
    requests: int | None = None  # a number of measured requests instead of a duration
    warmup: float = 1.0
    rate: float | None = None  # requests per second; None for a closed loop (as fast as answers come)
    new_connections: bool = False  # a fresh connection (full TLS handshake) per request
    resume: bool = False  # with new_connections: offer the previous TLS session (resumption)
    verify_every: int = 10  # check every n-th answer's plaintext (1: all)
    timeout: float = 30.0


@dataclass
class LoadResult:
    seconds: float = 0.0
    ok: int = 0
    keys: int = 0
    latencies: list[float] = field(default_factory=list)  # seconds, successful requests only
    by_status: Counter[int] = field(default_factory=Counter)  # non-200 answers
    connection_errors: int = 0
    mismatches: int = 0
    verified: int = 0
    connections: int = 0
    resumed: int = 0
    client_cpu: float = 0.0
    server_usage: CpuUsage | None = None

    @property
    def server_cpu(self) -> float | None:
        """Seconds, every process and thread of the server (when it could be read)."""
        return None if self.server_usage is None else self.server_usage.seconds

    @property
    def errors(self) -> int:
        return sum(self.by_status.values()) + self.connection_errors + self.mismatches


def combined_load(parts: Sequence[LoadResult]) -> LoadResult:
    """Slices of one load run, as one: every request and second of each, and the server's CPU over them all."""
    usages = [part.server_usage for part in parts]
    total = LoadResult(server_usage=None if None in usages else combined_usage([u for u in usages if u]))
    for part in parts:
        total.seconds += part.seconds
        total.ok += part.ok
        total.keys += part.keys
        total.latencies.extend(part.latencies)
        total.by_status.update(part.by_status)
        total.connection_errors += part.connection_errors
        total.mismatches += part.mismatches
        total.verified += part.verified
        total.connections += part.connections
        total.resumed += part.resumed
        total.client_cpu += part.client_cpu
    return total


def server_snapshot(pid: int) -> CpuSnapshot | None:
    """The CPU counters of a server's process tree on this host, or None when it is not readable."""
    try:
        taken = snapshot(pid)
    except OSError:
        return None
    return taken if taken.processes else None


class _Run:
    def __init__(self, source: RequestSource, plan: LoadPlan, context: ssl.SSLContext | None,
                 server_pid: int | None) -> None:
        self.source = source
        self.plan = plan
        self.context = context
        self.server_pid = server_pid
        self.result = LoadResult()
        self.next_n = 0
        self.recorded = 0
        self.loop = asyncio.get_running_loop()
        now = time.perf_counter()
        self.measure_from = now + plan.warmup
        self.measure_until = now + plan.warmup + plan.duration if plan.duration is not None else float("inf")
        self.rate_origin = now
        self.finished = False
        self.live: set[Connection] = set()
        self.closing: list[Connection] = []  # closed by a worker, perhaps not gone yet
        self._cpu0 = 0.0
        self._server0: CpuSnapshot | None = None
        self._measuring = False
        self._started_at = 0.0
        self._stopped_at = 0.0

    def _start_measuring(self) -> None:
        self._measuring = True
        self._started_at = time.perf_counter()
        self._cpu0 = time.process_time()
        self._server0 = server_snapshot(self.server_pid) if self.server_pid else None

    def _stop_measuring(self) -> None:
        if self.finished:
            return
        if not self._measuring:
            self._start_measuring()
        self.finished = True
        self._stopped_at = time.perf_counter()
        result = self.result
        result.seconds = self._stopped_at - self._started_at
        result.client_cpu = time.process_time() - self._cpu0
        if self._server0 is not None and self.server_pid:
            end = server_snapshot(self.server_pid)
            if end is not None:
                result.server_usage = usage(self._server0, end, cpus_allowed=cpus_allowed(self.server_pid))

    def _counting(self) -> bool:
        """Whether an answer (or error) that arrives now counts: between the two snapshots of the server's CPU,
        whenever its request was sent. A request sent before the first snapshot and answered after it spent
        part of its CPU inside the window, as one still in flight at the second snapshot did; leaving out the
        first kind but not the second charged the window with a full round of requests it did not count: with
        16 connections, 16 unwraps fewer in a one-second slice of 300 (5%)."""
        return self._measuring and not self.finished

    def _take(self) -> int | None:
        """The next request number, or None once the run is over."""
        now = time.perf_counter()
        if not self._measuring and now >= self.measure_from:
            self._start_measuring()
        if self.finished or now >= self.measure_until:
            self._stop_measuring()
            return None
        if self.plan.requests is not None and self._measuring and self.recorded >= self.plan.requests:
            return None
        n = self.next_n
        self.next_n += 1
        return n

    async def _connect(self) -> Connection:
        endpoint = self.source.endpoint
        conn = await Connection.open(endpoint.host, endpoint.port, self.context if endpoint.tls else None)
        self.result.connections += 1
        ssl_object = conn.ssl_object
        if ssl_object is not None and ssl_object.session_reused:
            self.result.resumed += 1
        return conn

    async def worker(self) -> None:
        plan, source, result = self.plan, self.source, self.result
        conn: Connection | None = None
        verify_every = max(1, plan.verify_every)
        try:
            while True:
                n = self._take()
                if n is None:
                    return
                begin = time.perf_counter()
                if plan.rate is not None:
                    scheduled = self.rate_origin + n / plan.rate
                    if scheduled > begin:
                        await asyncio.sleep(scheduled - begin)
                    begin = scheduled
                request, index = source.build(n, plan.new_connections)
                try:
                    if conn is None or conn.closed:
                        conn = await self._connect()
                        self.live.add(conn)
                    response = await conn.exchange(request)
                except (OSError, ProtocolError, TimeoutError, ssl.SSLError):
                    if self._counting():
                        result.connection_errors += 1
                    if conn is not None:
                        self._retire(conn)
                    conn = None
                    continue
                end = time.perf_counter()
                if isinstance(self.context, ResumingContext) and plan.resume:
                    conn.remember_session(self.context)
                if not response.keep_alive or plan.new_connections:
                    self._retire(conn)
                    conn = None
                if not self._counting():
                    continue
                self.recorded += 1
                if response.status != 200:
                    result.by_status[response.status] += 1
                    continue
                if n % verify_every == 0:
                    result.verified += 1
                    if not source.check(index, response.body):
                        result.mismatches += 1
                        continue
                result.ok += 1
                result.keys += source.keys_per_request
                result.latencies.append(end - begin)
        finally:
            if conn is not None:
                self._retire(conn)

    def _retire(self, conn: Connection) -> None:
        self.live.discard(conn)
        conn.close()
        if not conn.closed:
            self.closing.append(conn)
        if len(self.closing) > 1000:
            self.closing = [c for c in self.closing if not c.closed]

    async def watchdog(self) -> None:
        """Aborts requests that take longer than the timeout (cheaper than a timer per request)."""
        while True:
            await asyncio.sleep(min(1.0, self.plan.timeout / 4))
            cutoff = self.loop.time() - self.plan.timeout
            for conn in list(self.live):
                if 0 < conn.started_at < cutoff:
                    conn.abort(f"no answer within {self.plan.timeout} s")


async def run_load(source: RequestSource, plan: LoadPlan, context: ssl.SSLContext | None = None,
                   server_pid: int | None = None) -> LoadResult:
    """Drives the server and returns what was measured after the warm-up."""
    if plan.duration is None and plan.requests is None:
        raise ValueError("a load plan needs a duration or a number of requests")
    run = _Run(source, plan, context, server_pid)
    watchdog = asyncio.create_task(run.watchdog())
    try:
        await asyncio.gather(*(run.worker() for _ in range(plan.concurrency)))
    finally:
        watchdog.cancel()
        run._stop_measuring()
        await asyncio.gather(*(conn.wait_closed() for conn in run.closing if not conn.closed))
    return run.result
