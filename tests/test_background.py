"""Background writers run below the event loop's priority: the kernel's own nice value of each thread, read back."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import threading
from pathlib import Path

from lkm.audit import AuditLog
from lkm.background import BACKGROUND_NICE_STEPS, MAX_NICE, run_below_the_loop
from lkm.logs import OffLoopHandler
from tests.audit.chain import event
from tests.serveproc import wait_until


def _nice_of_threads(name: str) -> set[int]:
    """The nice values of this process's threads whose OS-visible name is `name` (other tests may have left some)."""
    found = [int(task) for task in os.listdir("/proc/self/task")
             if Path(f"/proc/self/task/{task}/comm").read_text().strip() == name]
    assert found, f"no thread named {name}"
    return {os.getpriority(os.PRIO_PROCESS, tid) for tid in found}


def _expected() -> int:
    return min(MAX_NICE, os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) + BACKGROUND_NICE_STEPS)


def test_a_thread_lowers_its_own_priority_and_no_other() -> None:
    seen: list[int] = []

    def lowered() -> None:
        run_below_the_loop()
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))

    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    worker = threading.Thread(target=lowered)
    worker.start()
    worker.join()
    assert seen == [_expected()]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine


def test_the_audit_writer_runs_below_the_loop(tmp_path: Path) -> None:
    async def write_one() -> set[int]:
        async with AuditLog(tmp_path / "audit.log") as log:
            await log.record(event(1))
            return _nice_of_threads("lkm-audit")

    assert asyncio.run(write_one()) == {_expected()}


def test_the_log_writer_runs_below_the_loop() -> None:
    stream = io.StringIO()
    writer = OffLoopHandler(logging.StreamHandler(stream), interval=0.01)
    try:
        writer.emit(logging.LogRecord("lkm.test", logging.WARNING, __file__, 1, "wakes the writer", (), None))
        wait_until(lambda: "wakes the writer" in stream.getvalue(), within=2.0)  # named and lowered first
        assert _nice_of_threads("lkm-log-writer") == {_expected()}
    finally:
        writer.stop()
