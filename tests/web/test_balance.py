"""lkm.web.balance: new platform connections go to the worker with the fewest open, never waiting long for one."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest

from lkm.client import client_ssl_context
from lkm.web.balance import DEFER_SECONDS, EMPTY, ConnectionBoard
from tests.conftest import Pki
from tests.serveproc import ServeProcess, prepare
from tests.test_supervisor import unwrap

# --- the board ----------------------------------------------------------------------------------------------


def test_a_connection_taken_by_another_worker_ends_the_wait_for_it(tmp_path: Path) -> None:
    """The next connection, seconds later, is left to the less busy worker too: its wait starts afresh."""
    path = tmp_path / "board"
    ConnectionBoard.create(path, 2)
    first, second = ConnectionBoard(path, 0), ConnectionBoard(path, 1)
    try:
        assert second.leave_to_another(3, now=10.0)  # the first has fewer: leave it to the first...
        first.note(1)  # ...which takes it
        assert second.leave_to_another(3, now=15.0)  # the next connection: a new wait, not a 5 s old one
        assert not second.leave_to_another(3, now=15.0 + DEFER_SECONDS * 1.01)  # still bounded
    finally:
        first.close()
        second.close()


def test_a_worker_leaves_a_connection_to_one_with_fewer_for_a_bounded_time(tmp_path: Path) -> None:
    path = tmp_path / "board"
    ConnectionBoard.create(path, 3)
    first, second = ConnectionBoard(path, 0), ConnectionBoard(path, 1)
    try:
        assert list(first.counts) == [0, 0, EMPTY]  # slot 2 has no worker: nobody waits for it
        assert not first.leave_to_another(0, now=10.0)  # as few as anyone: take it
        second.note(3)
        assert not first.leave_to_another(2, now=10.0)
        assert second.leave_to_another(3, now=10.0)  # the first has fewer: leave it to the first
        assert second.leave_to_another(3, now=10.0 + DEFER_SECONDS / 2)
        assert not second.leave_to_another(3, now=10.0 + DEFER_SECONDS * 1.01)  # waited long enough: take it
        assert second.leave_to_another(3, now=11.0)  # a new wait starts with the next connection
        first.note(5)
        assert not second.leave_to_another(3, now=11.001)  # nobody has fewer any more: the wait ends
        assert second.leave_to_another(6, now=12.0)
        ConnectionBoard.vacate(path, 0)  # the first worker exited: its slot is empty, not a worker with 0
        assert second.counts[0] == EMPTY
        assert not second.leave_to_another(6, now=12.001)
    finally:
        first.close()
        second.close()
    assert path.stat().st_mode & 0o777 == 0o600
    path.unlink()
    ConnectionBoard.vacate(path, 0)  # the board gone already (the supervisor stopping): nothing to do, no error


# --- two workers of a real server ---------------------------------------------------------------------------


def platform_connections(pid: int, port: int) -> int:
    """Established connections on the platform port held by process `pid` (from /proc: its socket inodes)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as lines:
            for line in list(lines)[1:]:
                fields = line.split()
                local_port = int(fields[1].rsplit(":", 1)[1], 16)
                if fields[3] == "01" and local_port == port and fields[9] in inodes:
                    count += 1
    return count


@pytest.mark.slow
async def test_connections_opened_together_are_spread_over_the_workers_and_a_stopped_one_holds_nobody_up(
        tmp_path: Path, certs: Pki, config_factory: Callable[..., Path]) -> None:
    config = config_factory(**{"limits.workers": 2})
    credential, record = prepare(config)
    with ServeProcess(config, tmp_path / "serve.log") as server:
        port = int(server.urls["platform"].rsplit(":", 1)[1])
        tls = client_ssl_context(certs.ca_file)

        async def connect() -> asyncio.StreamWriter:
            _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls, server_hostname="localhost")
            return writer

        writers = await asyncio.gather(*(connect() for _ in range(16)))  # a burst, as a platform node opens them
        try:
            workers = server.workers()
            held = [platform_connections(pid, port) for pid in workers]
            assert sum(held) == 16 and max(held) - min(held) <= 2, held

            # One worker stopped (wedged, or paused by a debugger): the other takes every new connection after
            # waiting DEFER_SECONDS at most for the stopped one, which shows as few connections as it.
            os.kill(workers[0], signal.SIGSTOP)
            try:
                for _ in range(3):
                    assert await asyncio.wait_for(unwrap(server, certs, credential, record), 10) == 200
            finally:
                os.kill(workers[0], signal.SIGCONT)
        finally:
            for writer in writers:
                writer.close()
                with contextlib.suppress(ConnectionError, ssl.SSLError):
                    await writer.wait_closed()
