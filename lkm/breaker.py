"""The unwrap-volume breaker: a caller whose unwraps jump far above its own recent baseline.

Per caller (authenticated identity) and per process, unwraps are counted in buckets of `bucket` seconds. The
baseline is an exponentially weighted average of the per-second rate of closed buckets (time constant
`baseline`); the current rate is the sum over the last `window` seconds. A caller trips when, after `warmup`
seconds of learning, its current rate exceeds `factor` times its baseline AND its window holds at least `floor`
unwraps, so small callers never trip. A trip is reported once (the server raises the metric, audits, and with
action slow or freeze writes the caller to the frozen list); the caller counts as anomalous until its rate
falls back under the threshold. The baseline does not learn from an anomalous window.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum


class BreakerAction(StrEnum):
    ALERT = "alert"  # metric and alert only
    SLOW = "slow"  # and throttle the caller to slow_per_second until `lkm unfreeze`
    FREEZE = "freeze"  # and refuse the caller until `lkm unfreeze`


@dataclass(frozen=True)
class BreakerSettings:
    action: BreakerAction = BreakerAction.ALERT
    window_seconds: float = 60.0
    baseline_seconds: float = 1800.0
    warmup_seconds: float = 600.0
    factor: float = 10.0
    floor: int = 3000  # unwraps in one window, per process
    slow_per_second: float = 1.0
    bucket_seconds: float = 10.0


@dataclass
class _Caller:
    first: float
    baseline: float = 0.0  # unwraps per second
    buckets: deque[tuple[int, int]] = field(default_factory=deque)  # (bucket number, count)
    anomalous: bool = False


class VolumeBreaker:
    def __init__(self, settings: BreakerSettings, *, callers: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.clock = clock
        self.callers = callers
        self._state: OrderedDict[str, _Caller] = OrderedDict()
        self._keep = max(1, math.ceil(settings.window_seconds / settings.bucket_seconds))
        self._alpha = 1.0 - math.exp(-settings.bucket_seconds / settings.baseline_seconds)

    def observe(self, caller: str, n: int = 1) -> bool | None:
        """Counts `n` unwraps. True: the caller just tripped; False: it just came back to normal; None: no change."""
        s = self.settings
        now = self.clock()
        state = self._state.pop(caller, None) or _Caller(first=now)
        self._state[caller] = state
        if len(self._state) > self.callers:
            self._state.popitem(last=False)
        number = int(now // s.bucket_seconds)
        self._close_buckets(state, number)
        if state.buckets and state.buckets[-1][0] == number:
            state.buckets[-1] = (number, state.buckets[-1][1] + n)
        else:
            state.buckets.append((number, n))
        in_window = sum(count for _, count in state.buckets)
        rate = in_window / s.window_seconds
        learned = now - state.first >= s.warmup_seconds
        anomalous = learned and in_window >= s.floor and rate > s.factor * state.baseline
        if anomalous == state.anomalous:
            return None
        state.anomalous = anomalous
        return anomalous

    def _close_buckets(self, state: _Caller, number: int) -> None:
        """Buckets that fell out of the window feed the baseline (each empty bucket between counts as 0)."""
        s = self.settings
        while state.buckets and state.buckets[0][0] <= number - self._keep:
            first, count = state.buckets.popleft()
            if not state.anomalous:
                state.baseline += self._alpha * (count / s.bucket_seconds - state.baseline)
            gap = min(self._keep * 4, (state.buckets[0][0] if state.buckets else number - self._keep + 1) - first - 1)
            for _ in range(max(0, gap)):
                state.baseline -= self._alpha * state.baseline

    def anomalous(self, caller: str) -> bool:
        state = self._state.get(caller)
        return state is not None and state.anomalous

    def baseline(self, caller: str) -> float:
        state = self._state.get(caller)
        return 0.0 if state is None else state.baseline
