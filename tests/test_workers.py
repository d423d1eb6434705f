"""The unwrap worker threads: results, exceptions and cancellation reach the right coroutine."""

from __future__ import annotations

import asyncio
import threading

import pytest

from lkm.workers import WorkerThreads


async def test_results_and_exceptions_come_back_to_their_callers() -> None:
    pool = WorkerThreads(2)
    try:
        names = await asyncio.gather(*(pool.run(lambda: threading.current_thread().name) for _ in range(20)))
        assert set(names) <= {"lkm-worker-0", "lkm-worker-1"}
        assert await pool.run(pow, 2, 10) == 1024

        def boom() -> None:
            raise ValueError("inside the worker")

        with pytest.raises(ValueError, match="inside the worker"):
            await pool.run(boom)
    finally:
        pool.close()


async def test_a_cancelled_caller_does_not_stop_the_job_or_the_pool() -> None:
    pool = WorkerThreads(1)
    started, release, finished = threading.Event(), threading.Event(), threading.Event()

    def slow() -> str:
        started.set()
        release.wait(5)
        finished.set()
        return "done"

    try:
        waiter = asyncio.ensure_future(pool.run(slow))
        await asyncio.to_thread(started.wait, 5)
        waiter.cancel()
        release.set()
        await asyncio.to_thread(finished.wait, 5)
        assert finished.is_set()  # a started private-key operation always completes
        assert await pool.run(lambda: "next") == "next"
    finally:
        pool.close()
    with pytest.raises(RuntimeError):
        pool.run(lambda: None)


def test_needs_a_thread() -> None:
    with pytest.raises(ValueError):
        WorkerThreads(0)
