"""lkm.breaker with an injected clock: a jump far above a caller's own baseline trips, a small caller never."""

from __future__ import annotations

from lkm.breaker import BreakerSettings, VolumeBreaker
from tests.conftest import FakeClock

SETTINGS = BreakerSettings(window_seconds=60, baseline_seconds=600, warmup_seconds=300, factor=10, floor=600,
                           bucket_seconds=10)


def steady(breaker: VolumeBreaker, clock: FakeClock, caller: str, per_second: int, seconds: int) -> list[bool]:
    changes = []
    for _ in range(seconds):
        change = breaker.observe(caller, per_second)
        if change is not None:
            changes.append(change)
        clock.advance(1)
    return changes


def test_a_jump_far_above_the_baseline_trips_and_a_return_clears(clock: FakeClock) -> None:
    breaker = VolumeBreaker(SETTINGS, clock=clock.monotonic)
    assert steady(breaker, clock, "hawk:platform", 5, 1800) == []  # normal traffic for half an hour
    assert 4 < breaker.baseline("hawk:platform") <= 5
    assert steady(breaker, clock, "hawk:platform", 200, 30) == [True]  # a bulk exfiltration
    assert breaker.anomalous("hawk:platform")
    assert steady(breaker, clock, "hawk:platform", 5, 120) == [False]
    assert breaker.baseline("hawk:platform") < 10  # the anomaly did not become the new normal


def test_small_callers_and_steady_growth_never_trip(clock: FakeClock) -> None:
    breaker = VolumeBreaker(SETTINGS, clock=clock.monotonic)
    steady(breaker, clock, "small", 0, 1)
    assert steady(breaker, clock, "small", 9, 1800) == []  # under the floor of 600 a minute
    changes = []
    for rate in range(5, 60, 5):  # growing traffic: the baseline follows
        changes += steady(breaker, clock, "growing", rate, 600)
    assert changes == []


def test_nothing_trips_during_warmup(clock: FakeClock) -> None:
    breaker = VolumeBreaker(SETTINGS, clock=clock.monotonic)
    assert steady(breaker, clock, "new", 1000, 299) == []  # a new caller's start is not an anomaly
    assert steady(breaker, clock, "other", 1, 301) == []
    assert steady(breaker, clock, "other", 1000, 10) == [True]  # after warm-up, the same start is
