"""The per-request metrics of a server process, written to their collectors in batches.

Each request makes about ten writes to prometheus-client values: two for the in-flight gauge, a counter and a
histogram's sum and bucket for the request, the same for the unwrap, and the key store's histogram. In the
multiprocess mode of a server with several processes, each write takes a lock, asks the kernel for the pid
(prometheus-client's check for a fork) and packs a float into a memory-mapped file: about 2 µs each. Measured
on one core at peak, the metrics cost about 20 µs per unwrap, against an RSA operation of about 720.

On the event loop's thread the writes are added up here instead, in plain dictionaries, and written once per
batch: when the loop runs out of work (`lkm.idleloop`), which a busy server does between rounds of requests,
and at least every `FLUSH_SECONDS` however busy it is. A write is one addition per child whatever the number
of requests it covers. A scrape may miss the last fraction of a second of requests; a process's own scrape
(single-process mode) flushes first. Writes from other threads (worker threads, the audit writer) go straight
to the collectors, as do observations a histogram cannot take in a batch (see `observe`).
"""

from __future__ import annotations

import asyncio
import bisect
import math
import threading
from collections.abc import Sequence
from typing import Any

from lkm.idleloop import call_when_idle

__all__ = ["FLUSH_SECONDS", "DeferredWrites"]

FLUSH_SECONDS = 0.25
"""The longest a count waits on a loop that never runs out of work."""


class _Observed:
    """A histogram's pending observations: their sum and their count per bucket."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.total = 0.0


class DeferredWrites:
    """Counter and gauge increments and histogram observations of one event loop's thread, written in batches.

    Until `attach` (or on a loop that cannot say when it is idle) every write goes straight through.
    """

    def __init__(self) -> None:
        self._thread: int | None = None  # the attached loop's thread: only its writes are deferred
        self._increments: dict[Any, float] = {}  # counter or gauge child -> amount
        self._observations: dict[Any, _Observed] = {}  # histogram child -> what it has not been given yet
        self._timer: asyncio.TimerHandle | None = None

    def attach(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Defers the writes made on `loop`'s thread (the caller's) from now on; False if `loop` cannot say
        when it runs out of work, and then nothing is deferred."""
        if not call_when_idle(loop, self.flush):
            return False
        self._thread = threading.get_ident()

        def tick() -> None:
            self.flush()
            self._timer = loop.call_later(FLUSH_SECONDS, tick)

        self._timer = loop.call_later(FLUSH_SECONDS, tick)
        return True

    def detach(self) -> None:
        """On the loop's thread, at shutdown: writes what is pending; later writes go straight through."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.flush()
        self._thread = None

    def inc(self, child: Any, amount: float = 1.0) -> None:
        """`child.inc(amount)` for a counter's or gauge's labelled child."""
        if threading.get_ident() != self._thread:
            child.inc(amount)
            return
        increments = self._increments
        increments[child] = increments.get(child, 0.0) + amount

    def observe(self, child: Any, value: float) -> None:
        """`child.observe(value)` for a histogram's labelled child."""
        if threading.get_ident() != self._thread or math.isnan(value):
            child.observe(value)  # NaN falls in no bucket there; the bucket search here would put it in the first
            return
        pending = self._observations.get(child)
        if pending is None:
            bounds = getattr(child, "_upper_bounds", None)
            if bounds is None or not hasattr(child, "_buckets") or not hasattr(child, "_sum"):
                child.observe(value)  # a prometheus-client without these parts: no batching for histograms
                return
            pending = self._observations[child] = _Observed(bounds)
        pending.total += value
        # The first bucket whose upper bound is at least the value, as Histogram.observe finds it.
        pending.counts[bisect.bisect_left(pending.bounds, value)] += 1

    def flush(self) -> None:
        """Writes everything pending; only on the attached loop's thread (elsewhere nothing is pending)."""
        if threading.get_ident() != self._thread:
            return
        if self._increments:
            increments, self._increments = self._increments, {}
            for child, amount in increments.items():
                if amount:
                    child.inc(amount)
        if self._observations:
            observations, self._observations = self._observations, {}
            for child, observed in observations.items():
                child._sum.inc(observed.total)
                for index, count in enumerate(observed.counts):
                    if count:
                        child._buckets[index].inc(count)
