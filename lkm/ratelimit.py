"""Per-identity rate limits on unwraps: a token bucket per caller, in each server process.

A caller is an authenticated identity (a Hawk id, a client-certificate rule); a batch spends one token per
item. The buckets are per process: with `limits.workers` N the whole server admits up to N times the configured
rate (the kernel spreads connections over the workers). The defaults are far above what one caller's normal
traffic needs (and above what a process can unwrap), so they only ever stop a runaway or a thief.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Rate:
    per_second: float
    burst: int


class TokenBuckets:
    """`take(caller, n, rate)`: 0.0 when admitted, else the seconds until `n` tokens will be there. Bounded LRU."""

    def __init__(self, *, callers: int = 10_000, clock: Callable[[], float] = time.monotonic) -> None:
        self.callers = callers
        self.clock = clock
        self._state: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, last refill

    def take(self, caller: str, n: int, rate: Rate) -> float:
        """`rate` is the caller's (the guard knows its overrides); a bucket starts full at its burst."""
        now = self.clock()
        tokens, last = self._state.pop(caller, (float(rate.burst), now))
        tokens = min(float(rate.burst), tokens + (now - last) * rate.per_second)
        wait = 0.0
        if tokens >= n:
            tokens -= n
        else:
            wait = (min(n, rate.burst) - tokens) / rate.per_second
        self._state[caller] = (tokens, now)
        if len(self._state) > self.callers:
            self._state.popitem(last=False)
        return wait


def retry_after(wait: float) -> int:
    """Whole seconds for Retry-After, at least 1."""
    return max(1, math.ceil(wait))
