"""Measuring in slices: the raw operation and the server alternate, and each side adds up its own slices."""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from typing import Any

import pytest

from lkm.bench import measure
from lkm.bench.cpu import CpuUsage, combined_usage
from lkm.bench.load import LoadPlan, LoadResult, combined_load
from lkm.bench.raw import RawResult, combined_raw
from lkm.bench.requests import Target
from tests.conftest import Running


def test_usages_add_up_by_job_and_the_busiest_thread_by_slice() -> None:
    first = CpuUsage(seconds=1.0, by_kind={"lkm-loop": 0.8, "lkm-audit": 0.2}, busiest_seconds=0.8,
                     busiest_kind="lkm-loop", processes=1, one_per_core=True)
    second = CpuUsage(seconds=2.0, by_kind={"lkm-loop": 0.5, "lkm-audit": 1.5}, busiest_seconds=1.5,
                      busiest_kind="lkm-audit", processes=2, one_per_core=False)
    both = combined_usage([first, second])
    assert both.seconds == 3.0 and both.by_kind == {"lkm-audit": 1.7, "lkm-loop": 1.3}
    assert list(both.by_kind) == ["lkm-audit", "lkm-loop"]  # the biggest first, as usage() orders them
    assert both.busiest_seconds == 2.3 and both.busiest_kind == "lkm-audit"
    assert both.processes == 2 and not both.one_per_core
    assert combined_usage([first, first]).one_per_core


def test_raw_slices_add_up_and_unknown_cpu_stays_unknown() -> None:
    both = combined_raw([RawResult(threads=2, seconds=1.0, operations=10, cpu_seconds=0.5),
                         RawResult(threads=2, seconds=0.5, operations=30, cpu_seconds=1.5)])
    assert (both.threads, both.seconds, both.operations) == (2, 1.5, 40)
    assert both.cpu_us_per_operation == pytest.approx(50_000.0)  # 2 s over 40, not the mean of 50 ms and 50 ms
    assert combined_raw([RawResult(threads=1, seconds=1.0, operations=1, cpu_seconds=None),
                         RawResult(threads=1, seconds=1.0, operations=1, cpu_seconds=1.0)]).cpu_seconds is None


def test_load_slices_add_up_with_every_latency() -> None:
    usage = CpuUsage(seconds=1.0, by_kind={"lkm-loop": 1.0}, busiest_seconds=1.0, busiest_kind="lkm-loop")
    first = LoadResult(seconds=1.0, ok=2, keys=2, latencies=[0.1, 0.3], by_status=Counter({503: 1}),
                       connections=4, client_cpu=0.25, server_usage=usage)
    second = LoadResult(seconds=1.5, ok=1, keys=1, latencies=[0.2], by_status=Counter({503: 2, 429: 1}),
                        connection_errors=1, mismatches=1, verified=1, connections=4, resumed=2, client_cpu=0.5,
                        server_usage=usage)
    both = combined_load([first, second])
    assert (both.seconds, both.ok, both.keys, both.connections, both.resumed) == (2.5, 3, 3, 8, 2)
    assert sorted(both.latencies) == [0.1, 0.2, 0.3] and both.by_status == Counter({503: 3, 429: 1})
    assert (both.connection_errors, both.mismatches, both.verified, both.client_cpu) == (1, 1, 1, 0.75)
    assert both.server_cpu == 2.0
    assert first.latencies == [0.1, 0.3]  # the slices themselves are left as they were
    assert combined_load([first, LoadResult(seconds=1.0)]).server_usage is None  # one slice without: unknown


def test_raw_runs_with_its_store_workers_on_the_cpus_given_and_a_server_stays() -> None:
    """A child that is not a server (as a PKCS#11 store's token worker) moves, every thread of it, with this
    thread; a child that runs an event loop (a server the benchmark started) does not; all as before after."""
    import subprocess
    import sys

    from lkm.threadnames import LOOP

    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs two CPUs")
    worker_script = "import threading, time; threading.Thread(target=time.sleep, args=(30,)).start(); time.sleep(30)"
    server_script = ("import sys, time; from lkm.threadnames import name_this_thread; name_this_thread(sys.argv[1]); "
                     "print('ready', flush=True); time.sleep(30)")
    worker = subprocess.Popen([sys.executable, "-c", worker_script])
    server = subprocess.Popen([sys.executable, "-c", server_script, LOOP], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline() == "ready\n"
        deadline = time.monotonic() + 5
        while len(os.listdir(f"/proc/{worker.pid}/task")) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        everywhere = os.sched_getaffinity(0)

        def masks(pid: int) -> set[frozenset[int]]:
            return {frozenset(os.sched_getaffinity(int(tid))) for tid in os.listdir(f"/proc/{pid}/task")}

        with measure.kept_to({cpus[-1]}):
            assert os.sched_getaffinity(0) == {cpus[-1]}
            assert masks(worker.pid) == {frozenset({cpus[-1]})}  # both of its threads
            assert masks(server.pid) == {frozenset(everywhere)}
        assert os.sched_getaffinity(0) == everywhere and masks(worker.pid) == {frozenset(everywhere)}
        with measure.kept_to(None):
            assert os.sched_getaffinity(0) == everywhere
    finally:
        for child in (worker, server):
            child.kill()
            child.wait()
        if server.stdout is not None:
            server.stdout.close()


@pytest.mark.slow
async def test_raw_and_server_alternate_in_slices(running: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    """Four slices of each over one second: the server's connections opened anew for each slice, and both sides'
    figures over all four."""
    monkeypatch.setattr(measure, "SLICE_SECONDS", 0.25)
    record = running.create_key()
    target = Target(platform_url=running.url("platform") + "/key-management/v1/decrypt",
                    ca_file=str(running.certs.ca_file), hawk=running.hawk, server_pid=os.getpid())
    key = (record.id, record.public_key_der)
    plan = LoadPlan(concurrency=2, duration=1.0, warmup=0.1)
    own = os.sched_getaffinity(0)

    def sliced() -> tuple[dict[str, Any], dict[str, Any]]:
        return asyncio.run(measure.measure_in_slices(running.store, target, plan, key=key, threads=1,
                                                     raw_name="raw", server_name="server", raw_cpus=own))

    raw, served = await asyncio.to_thread(sliced)  # the server keeps this thread's loop
    assert raw["slices"] == served["slices"] == 4
    assert raw["name"] == "raw" and raw["threads"] == 1 and raw["seconds"] == pytest.approx(1.0)
    assert raw["operations"] > 0 and raw["cpu_us_per_operation"] > 0
    assert served["name"] == "server" and served["seconds"] == pytest.approx(1.0, abs=0.2)
    assert served["connections"] == 4 * 2  # each slice opened its own
    assert served["requests"] > 0 and served["concurrency"] == 2
    assert served["errors"]["total"] == 0, served["errors"]
    assert served["server_cpu_us_per_unwrap"] > 0  # this process serves: its CPU over the four slices
    assert os.sched_getaffinity(0) == own
