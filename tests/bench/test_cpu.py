"""lkm bench's CPU accounting, against real processes that burn a known amount of CPU in named threads."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

from lkm.bench.cpu import process_tree, projection, server_figures, snapshot, usage
from lkm.threadnames import LOOP

# A process whose main thread is named like a server's event loop and which starts a child; on a line on stdin
# each burns `seconds` of CPU (thread CPU time, so a busy machine does not change it) in a thread named
# lkm-burn-1, then says "done" and waits for the next line.
BURN = textwrap.dedent("""
    import subprocess, sys, threading, time
    from lkm.threadnames import name_this_thread

    def burn_for(seconds):
        until = time.thread_time() + seconds
        while time.thread_time() < until:
            pass

    def burn(seconds, burned):
        name_this_thread()
        burn_for(seconds)
        burned.set()
        threading.Event().wait()  # stays, so that its CPU is its own (an exited thread's goes to the process)
""")
"""The start of a burning script: `burn(seconds, event)` for a thread's target, `burn_for(seconds)` inline."""
BURNER = BURN + textwrap.dedent("""
    name_this_thread(sys.argv[1])
    child = None
    if sys.argv[2] == "parent":
        child = subprocess.Popen([sys.executable, "-c", sys.argv[3], "lkm-child", "child", ""],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        child.stdout.readline()  # its "ready"
    print("ready", flush=True)
    for line in sys.stdin:
        if child is not None:
            child.stdin.write(line.encode()); child.stdin.flush()
        burned = threading.Event()
        threading.Thread(target=burn, args=(float(line), burned), name="lkm-burn-1", daemon=True).start()
        burned.wait()
        if child is not None:
            child.stdout.readline()
        print("done", flush=True)
""")


@pytest.fixture
def burner():  # type: ignore[no-untyped-def]
    with subprocess.Popen([sys.executable, "-c", BURNER, LOOP, "parent", BURNER], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True) as process:
        assert process.stdout is not None and process.stdout.readline() == "ready\n"
        yield process
        process.stdin.close()  # type: ignore[union-attr]  # the child's child sees EOF and ends too


def _burn(process: subprocess.Popen[str], seconds: float) -> None:
    assert process.stdin is not None and process.stdout is not None
    process.stdin.write(f"{seconds}\n")
    process.stdin.flush()
    assert process.stdout.readline() == "done\n"


@pytest.mark.slow
def test_cpu_of_every_thread_of_every_process_is_counted_by_name(burner: subprocess.Popen[str]) -> None:
    before = snapshot(burner.pid)
    assert len(process_tree(burner.pid)) == 2  # the process and its child
    _burn(burner, 0.4)
    spent = usage(before, snapshot(burner.pid), cpus_allowed=2)
    assert 0.78 <= spent.by_kind["lkm-burn"] <= 0.9  # 0.4 s in each process's lkm-burn thread
    assert 0.75 <= spent.seconds <= 1.0  # plus a little for Python and the pipes
    assert spent.processes == 1 and not spent.one_per_core  # one event-loop process (the child is not named so)


@pytest.mark.slow
def test_busiest_thread_is_a_live_thread_that_burned() -> None:
    script = BURN + textwrap.dedent("""
        events = [threading.Event(), threading.Event()]
        for n, (seconds, event) in enumerate(zip((0.3, 0.1), events)):
            threading.Thread(target=burn, args=(seconds, event), name=f"lkm-rsa-{n}", daemon=True).start()
        for event in events:
            event.wait()
        print("done", flush=True)
        sys.stdin.read()
    """)
    with subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          text=True) as process:
        before = snapshot(process.pid)
        assert process.stdout is not None and process.stdout.readline() == "done\n"
        spent = usage(before, snapshot(process.pid))
        process.kill()
    assert 0.35 <= spent.by_kind["lkm-rsa"] <= 0.5
    assert spent.busiest_kind == "lkm-rsa" and 0.28 <= spent.busiest_seconds <= 0.4
    figures = server_figures(spent, unwraps=1000)
    assert figures["busiest_thread"] == "lkm-rsa"
    assert 280 <= float(figures["busiest_thread_us_per_unwrap"]) <= 400  # type: ignore[arg-type]


@pytest.mark.slow
def test_a_thread_that_ends_between_snapshots_counts_only_what_it_spent_between_them() -> None:
    # Its CPU before the first snapshot is not in the window: counting its whole life inflated a raw run's CPU
    # per operation by the warm-up whenever the worker thread ended before the second snapshot.
    script = BURN + textwrap.dedent("""
        def burn_and_end():
            burn_for(0.3)
            print("burned", flush=True)
            sys.stdin.readline()
            burn_for(0.2)

        worker = threading.Thread(target=burn_and_end, name="lkm-burn-1")
        worker.start()
        worker.join()
        print("ended", flush=True)
        sys.stdin.read()
    """)
    with subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          text=True) as process:
        assert process.stdin is not None and process.stdout is not None
        assert process.stdout.readline() == "burned\n"
        before = snapshot(process.pid)
        process.stdin.write("go\n")
        process.stdin.flush()
        assert process.stdout.readline() == "ended\n"
        # join() returns once the thread's Python code is done, a moment before the kernel lets the thread go.
        deadline = time.monotonic() + 5.0
        while len(os.listdir(f"/proc/{process.pid}/task")) > 1 and time.monotonic() < deadline:
            time.sleep(0.005)
        spent = usage(before, snapshot(process.pid))
        process.kill()
    # An exited thread's CPU comes from the process's clock ticks (10 ms each, sampled): a few ticks either way
    # on a busy machine, far from the 0.5 s of its whole life.
    assert 0.15 <= spent.by_kind["(exited threads)"] <= 0.3
    assert 0.15 <= spent.seconds <= 0.35


def test_threads_that_all_live_leave_nothing_to_exited_threads() -> None:
    """Three threads burning all along, measured over thirty short windows: the process's total (in whole clock
    ticks) never differs from its live threads' exact times by more than rounding, so no window finds CPU of an
    exited thread. Comparing it with the threads' own tick counts and keeping every positive gap found some in
    most windows."""
    script = BURN + textwrap.dedent("""
        for _ in range(3):
            threading.Thread(target=burn_for, args=(60.0,), daemon=True).start()
        print("burning", flush=True)
        sys.stdin.read()
    """)
    with subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          text=True) as process:
        assert process.stdout is not None and process.stdout.readline() == "burning\n"
        windows = []
        for _ in range(30):
            before = snapshot(process.pid)
            time.sleep(0.03)
            windows.append(usage(before, snapshot(process.pid)))
        process.kill()
    assert all(window.seconds > 0 for window in windows)
    assert [window.by_kind for window in windows if "(exited threads)" in window.by_kind] == []


def test_a_process_that_is_gone_has_an_empty_snapshot() -> None:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    assert snapshot(process.pid).processes == {}


def test_projection() -> None:
    # Today's figures on one process: 1,144 us per unwrap, loop thread 317 us, raw 708 us.
    assert projection(server_us=1144, busiest_us=317, processes=1, one_per_core=False, raw_us=708,
                      cores=16) == pytest.approx((1 / 317) / (16 / 708))
    # One process per core: the CPU per unwrap is the limit.
    assert projection(server_us=800, busiest_us=800, processes=2, one_per_core=True, raw_us=708,
                      cores=16) == pytest.approx(708 / 800)
    assert projection(server_us=0, busiest_us=1, processes=1, one_per_core=True, raw_us=708, cores=16) == 0.0
