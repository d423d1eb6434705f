"""Load shedding: refuse with 503 and Retry-After rather than queue past the deadline; the admitted succeed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from lkm.admission import Admission, is_shed, runs_inline
from lkm.config import RsaExecution
from lkm.errors import Unavailable
from lkm.workers import WorkerThreads
from tests.conftest import Pki, Running, b64, start_server, wrap
from tests.test_observer import scrape, value


@contextlib.contextmanager
def threads(count: int) -> Iterator[WorkerThreads]:
    pool = WorkerThreads(count)
    try:
        yield pool
    finally:
        pool.close()


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_admits_while_the_expected_wait_fits_the_deadline() -> None:
    clock = Clock()
    shed: list[str] = []
    with threads(1) as pool:
        admission = Admission(pool, workers=2, deadline_seconds=0.25, on_shed=shed.append, clock=clock)
        admission.operation_seconds = 0.1
        admission.outstanding = 5  # 4 ahead of a newcomer on 2 workers: 0.2 s
        assert admission.expected_wait() == pytest.approx(0.2)
        assert await admission.run("platform", clock.now, 1, lambda: "done") == "done"
        admission.operation_seconds = 0.1  # (the instant job above pulled the average down)
        admission.outstanding = 6  # 0.25 s, plus the 10 ms the request already spent: over
        with pytest.raises(Unavailable) as refused:
            await admission.run("native", clock.now - 0.01, 1, lambda: "never")
    assert refused.value.status == 503 and refused.value.code == "overloaded" and refused.value.retry_after
    assert is_shed(refused.value)
    assert shed == ["native"] and admission.shed_count == 1


async def test_a_job_that_starts_too_late_is_dropped_unrun() -> None:
    ran = threading.Event()
    readings = iter([100.0])  # the admission check reads 100.0; every later reading, in the worker, 100.1

    def clock() -> float:
        return next(readings, 100.1)

    with threads(1) as pool:
        admission = Admission(pool, workers=1, deadline_seconds=0.25, clock=clock)
        with pytest.raises(Unavailable):  # admitted 0.2 s into its 0.25 s, its job could start only at 0.3 s
            await admission.run("platform", 99.8, 1, ran.set)
    assert not ran.is_set()
    assert admission.outstanding == 0 and admission.shed_count == 1


async def test_awaited_operations_run_workers_at_a_time_in_order_and_late_ones_are_refused() -> None:
    clock = Clock()
    shed: list[str] = []
    with threads(1) as pool:
        admission = Admission(pool, workers=2, deadline_seconds=0.25, on_shed=shed.append, clock=clock)
        started: list[int] = []
        gates = [asyncio.get_running_loop().create_future() for _ in range(4)]

        async def operation(n: int) -> int:
            started.append(n)
            return await gates[n]

        def job(n: int) -> Callable[[], asyncio.Future[int]]:
            return lambda: asyncio.ensure_future(operation(n))

        tasks = [asyncio.ensure_future(admission.run_awaited("platform", clock.now, 1, job(n))) for n in range(3)]
        await asyncio.sleep(0.01)
        assert started == [0, 1] and admission.outstanding == 3  # the third waits for one of two
        gates[1].set_result(1)
        await asyncio.sleep(0.01)
        assert started == [0, 1, 2]
        # One that waited past its deadline for its turn is refused unrun.
        late = asyncio.ensure_future(admission.run_awaited("native", clock.now, 1, job(3)))
        await asyncio.sleep(0.01)
        clock.now += 0.3
        gates[0].set_result(0)
        with pytest.raises(Unavailable):
            await late
        gates[2].set_result(2)
        assert await asyncio.gather(*tasks) == [0, 1, 2]
    assert started == [0, 1, 2] and shed == ["native"] and admission.outstanding == 0


async def test_moving_average_follows_the_operations() -> None:
    with threads(1) as pool:
        admission = Admission(pool, workers=1, deadline_seconds=1.0)
        for _ in range(200):
            admission.observe(4, 0.004)
    assert admission.operation_seconds == pytest.approx(0.001, rel=0.01)


@pytest.mark.parametrize("inline", [False, True], ids=["threads", "inline"])
async def test_chunks_are_admitted_whole_and_late_chunks_fail_alone(inline: bool) -> None:
    clock = Clock()
    ran_on: list[int] = []

    def slow_chunk() -> list[str]:
        ran_on.append(threading.get_ident())
        clock.now += 1.0  # the next chunk starts a second after the request arrived
        return ["a", "b"]

    with threads(1) as pool:
        admission = Admission(None if inline else pool, workers=2, deadline_seconds=0.25, clock=clock)
        results = await admission.run_chunks("batch", clock.now,
                                             [(2, slow_chunk), (1, lambda: ["c"]), (1, slow_chunk)])
    assert results[0] == ["a", "b"]
    assert all(isinstance(r, Unavailable) and r.code == "overloaded" for r in results[1:]), results
    assert admission.shed_count == 1 and admission.outstanding == 0  # one request shed, however many chunks
    assert (ran_on == [threading.get_ident()]) is inline  # inline: on the loop's thread; late chunks never run


@pytest.fixture(params=["threads", "inline"])
async def overloadable(request: pytest.FixtureRequest, tmp_path: Path, certs: Pki,
                       config_factory: Callable[..., Path], monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Running]:
    """One worker thread (or none: inline), a short deadline, and a key store that takes twice that an operation.

    50 ms leaves the first request time to arrive on a machine busy with other tests; any request behind an
    operation of 100 ms is certain to start late."""
    config = config_factory(**{"limits.worker_threads": 1, "limits.request_deadline_ms": 50,
                               "limits.rsa_execution": request.param})
    async with start_server(tmp_path, certs, config) as running:
        assert running.server.rsa_inline is (request.param == "inline")
        store = running.server.store
        original = store.decrypt

        def slow_decrypt(*args: object) -> bytes:
            time.sleep(0.1)
            result: bytes = original(*args)
            return result

        monkeypatch.setattr(store, "decrypt", slow_decrypt)
        yield running


@pytest.mark.slow
async def test_overload_is_shed_and_the_admitted_still_succeed(overloadable: Running) -> None:
    running = overloadable
    record = running.create_key()
    secrets = [os.urandom(32) for _ in range(24)]
    platform = running.platform()
    native = running.native("unwrapper")
    replies = await asyncio.gather(*(platform.decrypt(record.id, wrap(record, s)) for s in secrets[:12]),
                                   *(native.unwrap(record.id, wrap(record, s)) for s in secrets[12:]))
    statuses = [r.status for r in replies]
    assert set(statuses) == {200, 503}, statuses
    for secret, reply in zip(secrets, replies, strict=True):
        if reply.status == 200:
            assert reply.body.get("body", reply.body.get("key")) == b64(secret)
            continue
        assert reply.headers["Retry-After"] == "1"
        if "body" in reply.body or "status" in reply.body:  # the platform's shape
            assert reply.body == {"message": "server overloaded; retry shortly", "status": 503}
        else:
            assert reply.body["error"]["code"] == "overloaded"
    shed = statuses.count(503)
    samples = await scrape(running)
    assert value(samples, "lkm_requests_shed_total") == shed
    assert value(samples, "lkm_unwraps_total", outcome="unavailable") == shed
    audited = [e for e in running.audit_lines() if e.get("action") == "unwrap"]
    assert len(audited) == statuses.count(200)  # a refusal for overload touches no key: counted, not audited


@pytest.mark.slow
async def test_a_batch_behind_the_deadline_is_refused_whole(overloadable: Running) -> None:
    running = overloadable
    record = running.create_key()
    items = [{"id": record.id, "wrapped_key": b64(wrap(record, os.urandom(32)))} for _ in range(3)]
    native = running.native("unwrapper")
    # 20 batches of 3: past the first 16 operations even the initial guess of 3 ms each overruns 50 ms.
    replies = await asyncio.gather(*(native.request("POST", "/v1/unwrap", {"items": items}) for _ in range(20)))
    statuses = sorted(r.status for r in replies)
    assert statuses[0] == 200 and statuses[-1] == 503, statuses
    for reply in replies:
        if reply.status == 503:
            assert reply.body["error"]["code"] == "overloaded"
        else:
            results = reply.body["results"]
            assert all("key" in r or r["error"]["code"] == "overloaded" for r in results)


async def test_inline_operations_run_on_the_loop_and_late_ones_are_refused() -> None:
    clock = Clock()
    loop_thread = threading.get_ident()
    ran_on: list[int] = []
    admission = Admission(None, deadline_seconds=0.25, clock=clock)
    admission.operation_seconds = 0.01  # the estimate admits all five; the clock then shows them late

    def operation() -> str:
        ran_on.append(threading.get_ident())
        clock.now += 0.1  # each operation takes 0.1 s on the loop
        return "done"

    outcomes = await asyncio.gather(*(admission.run("platform", clock.now, 1, operation) for _ in range(5)),
                                    return_exceptions=True)
    # All five were ready together: the first three start within 0.25 s, the others would start after it.
    assert outcomes[:3] == ["done"] * 3
    assert all(is_shed(o) for o in outcomes[3:] if isinstance(o, BaseException)) and len(outcomes) == 5
    assert ran_on == [loop_thread] * 3 and admission.shed_count == 2 and admission.outstanding == 0


async def test_inline_admission_counts_the_operations_queued_on_the_loop() -> None:
    clock = Clock()
    admission = Admission(None, deadline_seconds=0.25, clock=clock)
    admission.operation_seconds = 0.1
    ran: list[int] = []
    outcomes = await asyncio.gather(*(admission.run("native", clock.now, 1, ran.append, n) for n in range(5)),
                                    return_exceptions=True)
    # The estimate refuses the fourth and fifth before they queue (3 ahead x 0.1 s > 0.25 s): they never run.
    assert ran == [0, 1, 2] and sum(is_shed(o) for o in outcomes if isinstance(o, BaseException)) == 2


def test_automatic_execution_is_inline_with_one_process_per_core_on_an_in_process_store() -> None:
    auto, inline, threaded = RsaExecution.AUTO, RsaExecution.INLINE, RsaExecution.THREADS
    assert runs_inline(auto, in_process_store=True, processes=4, cpus=4)
    assert runs_inline(auto, in_process_store=True, processes=1, cpus=1)
    assert not runs_inline(auto, in_process_store=True, processes=1, cpus=4)  # threads use the other cores
    assert not runs_inline(auto, in_process_store=False, processes=4, cpus=4)  # a token computes elsewhere
    assert runs_inline(inline, in_process_store=False, processes=1, cpus=4)
    assert not runs_inline(threaded, in_process_store=True, processes=4, cpus=4)
