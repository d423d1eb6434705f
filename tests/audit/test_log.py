"""lkm.audit.log: AuditLog's group commit, its start and close, and what a failed write does to waiters."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from lkm.audit import (
    AuditLog,
    AuditWriteError,
    verify,
    verify_chain_files,
)
from lkm.audit import log as log_module
from lkm.config import AuditSettings
from lkm.idleloop import call_when_idle
from tests.audit.chain import event, lines_of
from tests.conftest import eventually, run_on_idle_aware_loop


def is_file(fd: int, path: Path) -> bool:
    """Whether `fd` is open on the file at `path` (for spies on os calls that take a descriptor)."""
    return path.exists() and os.path.samestat(os.fstat(fd), path.stat())


def test_from_settings(tmp_path: Path) -> None:
    settings = AuditSettings(path=tmp_path / "a.log", fail_closed=False, max_bytes=1234, keep_files=3)
    log = AuditLog.from_settings(settings)
    assert (log.path, log.fail_closed, log.max_bytes, log.keep_files) == (tmp_path / "a.log", False, 1234, 3)


async def test_concurrent_records_are_group_committed(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    async with AuditLog(path) as log:
        await asyncio.gather(*(log.record(event(i)) for i in range(200)))
        assert log.records_written == 200
        assert log.fsync_count < 200
        assert log.batch_count == log.fsync_count  # one fsync per batch, no rotation here
    lines = lines_of(path)
    assert len(lines) == 200
    assert sorted(json.loads(line)["request_id"] for line in lines) == sorted(f"req-{i}" for i in range(200))
    res = verify([path])
    assert res.ok and res.records == 200 and res.last_seq == 200


async def test_a_steady_trickle_of_records_shares_fsyncs(tmp_path: Path) -> None:
    """Closed-loop callers, each sending its next request once its record is durable, with each request's
    private-key operation on the loop: their records are written several per fsync, not one by one."""
    path = tmp_path / "audit.log"

    async def caller(who: int) -> None:
        for i in range(30):
            time.sleep(0.0005)  # this request's private-key operation, inline on the loop
            await log.record(event(who * 100 + i))

    async with AuditLog(path) as log:
        await asyncio.gather(*(caller(who) for who in range(4)))
        assert log.records_written == 120
        assert log.records_written / log.batch_count >= 3
    assert verify([path]).records == 120


def test_a_busy_writer_stops_lingering_once_its_loop_runs_out_of_work(tmp_path: Path) -> None:
    """Once the loop has nothing left to run and nothing is under way, no record can join the next write:
    waiting out the linger would only hold the callers in flight."""
    path = tmp_path / "audit.log"
    coming = False
    batches: list[int] = []

    async def scenario() -> None:
        nonlocal coming
        log = AuditLog(path, records_coming=lambda: coming, linger_seconds=30.0, on_written=batches.append)
        assert call_when_idle(asyncio.get_running_loop(), log.loop_idle)
        async with log:
            # Records that pile up behind a write in progress make the writer busy (it lingers next time).
            holder = os.open(log.lock_path, os.O_RDWR | os.O_CREAT)
            try:
                fcntl.flock(holder, fcntl.LOCK_EX)
                first = asyncio.ensure_future(log.record(event(1)))
                await asyncio.sleep(0)  # the record is pending...
                await eventually(lambda: not log._pending, within=10)  # ...until the writer takes it to the lock
                behind = [asyncio.ensure_future(log.record(event(i))) for i in (2, 3)]
                await asyncio.sleep(0)
            finally:
                fcntl.flock(holder, fcntl.LOCK_UN)
                os.close(holder)
            # Busy, but the loop idles and nothing is under way: written at once, not after 30 s.
            await asyncio.wait_for(asyncio.gather(first, *behind), 10)
            assert batches == [1, 2]
            # Busy, the loop idle, an operation under way: the record waits for the one still to come...
            coming = True
            lingering = asyncio.ensure_future(log.record(event(4)))
            await asyncio.sleep(0.3)
            assert not lingering.done()
            # ...which joins it in one write; then the loop idles again, with nothing under way.
            coming = False
            await asyncio.wait_for(asyncio.gather(lingering, log.record(event(5))), 10)
            assert batches == [1, 2, 2]
            # A record while the loop still has work ready (the callbacks below) waits for that work.
            last = asyncio.ensure_future(log.record(event(6)))
            loop = asyncio.get_running_loop()
            busy_until = time.monotonic() + 0.3

            def keep_busy() -> None:
                if time.monotonic() < busy_until:
                    time.sleep(0.001)
                    loop.call_soon(keep_busy)
            keep_busy()
            await asyncio.sleep(0.2)  # the loop sleeps only once keep_busy stops
            assert not last.done()
            await asyncio.wait_for(last, 10)
            assert batches == [1, 2, 2, 1]

    run_on_idle_aware_loop(scenario)
    assert verify([path]).records == 6


async def test_without_an_idle_signal_a_busy_writer_lingers(tmp_path: Path) -> None:
    """On a loop that cannot say it is idle, the writer cannot know that nothing more is coming."""
    batches: list[int] = []
    async with AuditLog(tmp_path / "audit.log", records_coming=lambda: False, linger_seconds=0.5,
                        on_written=batches.append) as log:
        assert not call_when_idle(asyncio.get_running_loop(), log.loop_idle)
        await asyncio.gather(*(log.record(event(i)) for i in range(8)))
        started = time.monotonic()
        await log.record(event(9))
        waited = time.monotonic() - started
    assert sum(batches) == 9 and (batches[-1] == 1) and waited >= 0.4


async def test_record_returns_only_after_its_line_is_fsynced_off_the_loop(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "audit.log"
    real_fsync = os.fsync
    synced: list[int] = []  # file sizes at each fsync of the audit file
    threads: set[str] = set()
    loop_thread = threading.current_thread().name

    def spy(fd: int) -> None:
        real_fsync(fd)
        if is_file(fd, path):
            synced.append(os.fstat(fd).st_size)
            threads.add(threading.current_thread().name)

    monkeypatch.setattr(os, "fsync", spy)

    async def one(i: int) -> None:
        await log.record(event(i))
        data = path.read_bytes()
        end = data.index(f'"req-{i}"'.encode())
        end = data.index(b"\n", end) + 1
        assert synced and max(synced) >= end, f"req-{i} returned before its line was fsynced"

    async with AuditLog(path) as log:
        await asyncio.gather(*(one(i) for i in range(50)))
        for i in range(50, 60):
            await one(i)
    assert synced
    assert loop_thread not in threads
    assert verify([path]).records == 60


async def test_close_flushes_pending_and_refuses_later_records(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(path)
    await log.start()
    tasks = [asyncio.create_task(log.record(event(i))) for i in range(30)]
    await asyncio.sleep(0)  # the tasks queue their records
    await log.close()
    assert all(t.done() and t.exception() is None for t in tasks)
    assert len(lines_of(path)) == 30
    with pytest.raises(AuditWriteError, match="closed"):
        await log.record(event(99))
    assert verify([path]).ok


async def test_record_starts_the_writer_lazily(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.log")
    try:
        await log.record(event(1))
    finally:
        await log.close()
    assert verify([tmp_path / "audit.log"]).records == 1


async def test_server_writer_keeps_its_file_open_yet_follows_other_writers(tmp_path: Path) -> None:
    """The server's writer keeps the audit file open between appends; a CLI append or a rotation by another
    writer in between must still be chained after, never written to the old, renamed file."""
    path = tmp_path / "audit.log"
    server, cli = AuditLog(path, max_bytes=1500), AuditLog(path, max_bytes=1500)
    async with server:
        for i in range(12):
            await server.record(event(i))
            cli.record_sync(event(100 + i))  # fills the file, so some of these rotate it under the server
        head_reads = server.head_reads
        await server.record(event(999))
        await server.record(event(1000))
        assert server.head_reads == head_reads + 1  # re-read once after the CLI's append, then cached
    assert cli.rotations > 0 and server.rotations > 0
    res = verify_chain_files(path)
    assert res.ok, res
    assert res.records == 26 and res.files > 2


async def test_write_failure_fails_every_waiter_and_marks_unhealthy(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    calls: list[int] = []
    log = AuditLog(blocker / "audit.log", on_failure=lambda: calls.append(1))
    assert not log.check_writable()
    async with log:
        results = await asyncio.gather(*(log.record(event(i)) for i in range(5)), return_exceptions=True)
    assert all(isinstance(r, AuditWriteError) for r in results), results
    assert not log.healthy
    assert log.write_failures >= 1
    assert len(calls) == log.write_failures
    assert log.last_error is not None and "NotADirectoryError" in log.last_error
    with pytest.raises(AuditWriteError):
        log.record_sync(event(9))
    assert len(calls) == log.write_failures


async def test_recovery_after_the_directory_comes_back(tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    directory.mkdir()
    path = directory / "audit.log"
    failures: list[int] = []
    async with AuditLog(path, on_failure=lambda: failures.append(1)) as log:
        await log.record(event(1))
        assert log.healthy and log.check_writable()
        shutil.rmtree(directory)
        assert not log.check_writable()
        with pytest.raises(AuditWriteError):
            await log.record(event(2))
        assert not log.healthy and log.write_failures == 1 and failures == [1]
        error = log.last_error
        directory.mkdir()
        await log.record(event(3))
        assert log.healthy
        assert log.last_error == error  # kept for diagnosis
    res = verify([path])
    assert res.ok and res.records == 1


async def test_the_loop_writes_and_the_writer_fsyncs_with_the_chain_locked_throughout(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Between the loop's write and the writer's fsync the records are not durable: no other writer may chain
    onto them, so the lock is held until the fsync is done."""
    path = tmp_path / "audit.log"
    real_write, real_fsync = os.write, os.fsync
    writers: set[str] = set()
    lock_free_during_fsync: list[bool] = []

    def write_spy(fd: int, data: Any) -> int:
        if is_file(fd, path):
            writers.add(threading.current_thread().name)
        return real_write(fd, data)

    def fsync_spy(fd: int) -> None:
        if is_file(fd, path):
            probe = os.open(log.lock_path, os.O_RDWR)
            try:
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
                lock_free_during_fsync.append(True)
                fcntl.flock(probe, fcntl.LOCK_UN)
            except BlockingIOError:
                lock_free_during_fsync.append(False)
            finally:
                os.close(probe)
        real_fsync(fd)

    async with AuditLog(path) as log:
        await log.record(event(0))  # a new file: written whole by the writer thread
        monkeypatch.setattr(os, "write", write_spy)
        monkeypatch.setattr(os, "fsync", fsync_spy)
        await asyncio.gather(*(log.record(event(i)) for i in range(1, 40)))
    assert writers == {threading.current_thread().name}
    assert lock_free_during_fsync and not any(lock_free_during_fsync)
    assert verify([path]).records == 40


@pytest.mark.parametrize(("held_for", "patience"), [(0.001, 10.0), (0.2, 0.002)])
async def test_a_batch_that_finds_the_chain_held_by_another_process_waits_for_it_on_the_loop_a_while(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, held_for: float, patience: float) -> None:
    """Another writer holds the chain while it fsyncs. Held for less than CHAIN_BUSY_SECONDS (`patience`), the
    loop tries again and writes the batch itself once the chain is free; held longer, the writer thread takes the
    batch and waits for the lock. Either way every record is durable before its caller resumes."""
    monkeypatch.setattr(log_module, "CHAIN_BUSY_SECONDS", patience)
    path = tmp_path / "audit.log"
    real_write = os.write
    writers: set[str] = set()

    def write_spy(fd: int, data: Any) -> int:
        if is_file(fd, path):
            writers.add(threading.current_thread().name)
        return real_write(fd, data)

    async with AuditLog(path) as log:
        await log.record(event(0))  # a new file: written whole by the writer thread
        other = os.open(log.lock_path, os.O_RDWR)  # its own open file: its flock excludes the log's
        try:
            fcntl.flock(other, fcntl.LOCK_EX)
            monkeypatch.setattr(os, "write", write_spy)
            released: list[bool] = []

            def release() -> None:
                released.append(True)
                fcntl.flock(other, fcntl.LOCK_UN)

            asyncio.get_running_loop().call_later(held_for, release)
            await asyncio.gather(*(log.record(event(i)) for i in range(1, 9)))
            assert released  # nobody resumed while the chain was held
        finally:
            os.close(other)
    waited_on_the_loop = held_for < patience
    assert writers == ({threading.current_thread().name} if waited_on_the_loop else {"lkm-audit"})
    assert verify([path]).records == 9


async def test_a_failed_fsync_takes_the_batch_back_and_the_chain_goes_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "audit.log"
    real_fsync = os.fsync
    failures: list[int] = []

    def failing_fsync(fd: int) -> None:
        if is_file(fd, path):
            raise OSError(5, "Input/output error")
        real_fsync(fd)

    async with AuditLog(path, on_failure=lambda: failures.append(1)) as log:
        await log.record(event(1))
        size = path.stat().st_size
        monkeypatch.setattr(os, "fsync", failing_fsync)
        results = await asyncio.gather(*(log.record(event(i)) for i in range(2, 6)), return_exceptions=True)
        assert results and all(isinstance(r, AuditWriteError) for r in results), results
        assert path.stat().st_size == size  # nothing of the failed batches stays in the file
        assert not log.healthy and failures
        monkeypatch.undo()
        await log.record(event(6))
        assert log.healthy
    res = verify([path])
    assert res.ok and res.records == 2


async def test_a_torn_tail_left_by_another_writer_is_repaired_off_the_loop(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "audit.log"
    real_ftruncate = os.ftruncate
    repaired_on: list[str] = []

    def spy(fd: int, length: int) -> None:
        repaired_on.append(threading.current_thread().name)
        real_ftruncate(fd, length)

    monkeypatch.setattr(os, "ftruncate", spy)
    async with AuditLog(path) as log:
        await log.record(event(1))
        await log.record(event(2))
        with path.open("ab") as f:  # another process died mid-write, holding the lock
            f.write(b'{"seq":3,"half a rec')
        await log.record(event(3))
        await asyncio.gather(*(log.record(event(i)) for i in range(4, 10)))
    assert repaired_on == ["lkm-audit"]  # the repair fsyncs: never on the loop
    res = verify([path])
    assert res.ok and res.records == 9


def test_records_come_from_the_loop_the_log_started_on(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.log")

    async def elsewhere() -> None:
        with pytest.raises(AuditWriteError, match="event loop it was started on"):
            await log.record(event(2))

    async def first() -> None:
        await log.start()
        await log.record(event(1))
        await asyncio.to_thread(asyncio.run, elsewhere())  # another thread's loop, while this one runs

    with asyncio.Runner() as runner:
        runner.run(first())
        with asyncio.Runner() as other:
            other.run(elsewhere())
        runner.run(log.close())
    assert verify([tmp_path / "audit.log"]).records == 1
