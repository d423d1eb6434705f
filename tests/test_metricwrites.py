"""Per-request metrics written in batches on a server's event loop (lkm.metricwrites), read back from the real
prometheus-client collectors and their exposition."""

from __future__ import annotations

import asyncio
import threading
import time

from lkm.metrics import LATENCY_BUCKETS, Metrics
from lkm.metricwrites import FLUSH_SECONDS
from lkm.observer import MetricsObserver
from tests.conftest import run_on_idle_aware_loop

KEY = "0b6f4b64-6a4f-4f83-9d0e-2b7f8e9c1a55"
# Every bucket of the latency histogram, values exactly on its bounds, and one past the last.
VALUES = [*LATENCY_BUCKETS, *(b * 0.9 for b in LATENCY_BUCKETS), 7.5, 0.0]


def _requests(metrics: Metrics) -> None:
    observer = MetricsObserver(metrics)
    for n, seconds in enumerate(VALUES):
        observer.inflight("platform", 1)
        metrics.observe_keystore("file", "decrypt", seconds / 2)
        metrics.observe_unwrap("platform", "ok" if n % 3 else "decryption_failed", seconds, KEY)
        metrics.observe_http("platform", "/key-management/v1/decrypt", "POST", 200 if n % 3 else 400, seconds)
        observer.inflight("platform", -1)
    observer.inflight("platform", 1)  # one still in flight


def _exposition(metrics: Metrics) -> list[str]:
    """The scrape without the creation timestamps, which differ between two registries."""
    body, _ = metrics.render()
    return [line for line in body.decode().splitlines() if "_created" not in line]


def _one_unwrap_pending() -> Metrics:
    """Metrics batched on the running loop, with one unwrap counted and not written yet."""
    metrics = Metrics()
    assert metrics.writes.attach(asyncio.get_running_loop())
    metrics.observe_unwrap("platform", "ok", 0.002, KEY)
    assert _unwraps(metrics) == 0.0
    return metrics


def _unwraps(metrics: Metrics) -> float:
    return metrics.registry.get_sample_value(
        "lkm_unwraps_total", {"route": "platform", "key_id": KEY, "outcome": "ok"}) or 0.0


def test_batched_writes_scrape_exactly_as_direct_ones() -> None:
    direct = Metrics()
    _requests(direct)

    async def batched() -> None:
        metrics = Metrics()
        assert metrics.writes.attach(asyncio.get_running_loop())
        _requests(metrics)
        assert _unwraps(metrics) == 0.0  # held back while the loop has work
        await asyncio.sleep(0.01)  # the loop runs out of work: the batch is written
        assert _unwraps(metrics) == _unwraps(direct) > 0
        assert _exposition(metrics) == _exposition(direct)

    run_on_idle_aware_loop(batched)


def test_a_scrape_of_the_process_itself_writes_what_is_pending_first() -> None:
    async def scrape() -> None:
        metrics = _one_unwrap_pending()
        assert f'lkm_unwraps_total{{key_id="{KEY}",outcome="ok",route="platform"}} 1.0' in _exposition(metrics)

    run_on_idle_aware_loop(scrape)


def test_a_loop_that_never_runs_out_of_work_writes_within_the_flush_interval() -> None:
    async def busy() -> None:
        metrics = _one_unwrap_pending()
        began = time.monotonic()
        while True:  # a task that is always ready again: the loop never waits, so it never runs out of work
            if _unwraps(metrics) or time.monotonic() - began >= 4 * FLUSH_SECONDS:
                break
            await asyncio.sleep(0)
        assert _unwraps(metrics) == 1.0
        assert FLUSH_SECONDS * 0.9 <= time.monotonic() - began < 4 * FLUSH_SECONDS

    run_on_idle_aware_loop(busy)


def test_writes_from_other_threads_and_after_detach_go_straight_through() -> None:
    async def threads() -> None:
        metrics = Metrics()
        metrics.writes.attach(asyncio.get_running_loop())
        worker = threading.Thread(target=metrics.observe_unwrap, args=("platform", "ok", 0.002, KEY))
        worker.start()
        worker.join()
        assert _unwraps(metrics) == 1.0  # at once, without the loop
        metrics.observe_unwrap("platform", "ok", 0.002, KEY)
        metrics.writes.detach()  # a stopping server: what is pending is written
        assert _unwraps(metrics) == 2.0
        metrics.observe_unwrap("platform", "ok", 0.002, KEY)
        assert _unwraps(metrics) == 3.0

    run_on_idle_aware_loop(threads)


def test_nothing_is_held_back_on_a_loop_that_cannot_say_when_it_is_idle() -> None:
    async def plain() -> None:
        metrics = Metrics()
        assert not metrics.writes.attach(asyncio.get_running_loop())
        metrics.observe_unwrap("platform", "ok", 0.002, KEY)
        assert _unwraps(metrics) == 1.0

    asyncio.run(plain())
