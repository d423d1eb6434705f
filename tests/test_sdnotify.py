"""lkm.sdnotify against a real AF_UNIX datagram socket bound the way systemd binds NOTIFY_SOCKET."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lkm.sdnotify import Notifier


@pytest.fixture
def path_socket() -> Iterator[tuple[socket.socket, str]]:
    # AF_UNIX paths are limited to 107 bytes, so not under pytest's (long) tmp_path.
    with tempfile.TemporaryDirectory(prefix="lkm-notify-") as directory:
        path = str(Path(directory) / "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(path)
            sock.settimeout(5)
            yield sock, path


@pytest.fixture
def abstract_socket() -> Iterator[tuple[socket.socket, str]]:
    name = f"lkm-test-{secrets.token_hex(8)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(5)
        yield sock, "@" + name


def received(sock: socket.socket) -> dict[str, str]:
    data = sock.recv(4096).decode()
    return dict(line.split("=", 1) for line in data.split("\n"))


def nothing_waiting(sock: socket.socket) -> bool:
    sock.settimeout(0.05)
    try:
        sock.recv(4096)
    except TimeoutError:
        return True
    return False


@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_every_message_arrives(kind: str, request: pytest.FixtureRequest) -> None:
    sock, address = request.getfixturevalue(f"{kind}_socket")
    env = {"NOTIFY_SOCKET": address}
    notifier = Notifier.from_environ(env)
    assert notifier.enabled
    assert env == {}, "the variables are unset so that worker processes do not inherit them"

    assert notifier.ready(status="serving 3 listeners")
    assert received(sock) == {"READY": "1", "STATUS": "serving 3 listeners"}

    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.reloading()
    message = received(sock)
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert message["RELOADING"] == "1"
    assert before <= int(message["MONOTONIC_USEC"]) <= after
    assert set(message) == {"RELOADING", "MONOTONIC_USEC"}

    assert notifier.stopping()
    assert received(sock) == {"STOPPING": "1"}
    assert notifier.watchdog()
    assert received(sock) == {"WATCHDOG": "1"}


def test_status_cannot_inject_other_assignments(path_socket: tuple[socket.socket, str]) -> None:
    sock, address = path_socket
    notifier = Notifier(address)
    assert notifier.status("key store open\nREADY=1\nMAINPID=1")
    assert received(sock) == {"STATUS": "key store open READY=1 MAINPID=1"}


def test_no_socket_is_a_no_op() -> None:
    env = {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
    notifier = Notifier.from_environ(env)
    assert not notifier.enabled
    assert not notifier.ready()
    assert not notifier.reloading()
    assert not notifier.stopping()
    assert not notifier.status("x")
    assert not notifier.watchdog()
    assert notifier.watchdog_interval is None


@pytest.mark.parametrize("value", ["relative/path", "@", "vsock:2:1234"])
def test_unusable_addresses_are_ignored(value: str) -> None:
    assert not Notifier.from_environ({"NOTIFY_SOCKET": value}).enabled


def test_a_socket_nobody_listens_on_is_reported_not_raised(tmp_path: Path) -> None:
    notifier = Notifier(str(tmp_path / "gone"))
    assert notifier.enabled
    assert not notifier.ready()


def test_environment_is_kept_when_asked(path_socket: tuple[socket.socket, str]) -> None:
    _, address = path_socket
    env = {"NOTIFY_SOCKET": address, "OTHER": "x"}
    Notifier.from_environ(env, unset=False)
    assert env == {"NOTIFY_SOCKET": address, "OTHER": "x"}
    Notifier.from_environ(env)
    assert env == {"OTHER": "x"}


@pytest.mark.parametrize(("env", "interval"), [
    ({"WATCHDOG_USEC": "3000000"}, 1.5),
    ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "{pid}"}, 1.5),
    ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"}, None),      # another process's watchdog
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
    ({}, None),
])
def test_watchdog_interval(path_socket: tuple[socket.socket, str], env: dict[str, str],
                           interval: float | None) -> None:
    _, address = path_socket
    env = {k: v.format(pid=os.getpid()) for k, v in env.items()}
    assert Notifier.from_environ({"NOTIFY_SOCKET": address, **env}).watchdog_interval == interval


@pytest.mark.slow
async def test_keep_watchdog_pings_until_cancelled(path_socket: tuple[socket.socket, str]) -> None:
    sock, address = path_socket
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "100000"})
    assert notifier.watchdog_interval == 0.05
    task = asyncio.create_task(notifier.keep_watchdog())
    loop = asyncio.get_running_loop()
    for _ in range(3):
        assert await loop.run_in_executor(None, received, sock) == {"WATCHDOG": "1"}
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.15)
    # At most one datagram could have been in flight at the cancellation; then silence.
    sock.settimeout(0.01)
    with contextlib.suppress(TimeoutError):
        sock.recv(4096)
    assert nothing_waiting(sock)


async def test_keep_watchdog_returns_at_once_without_a_watchdog(path_socket: tuple[socket.socket, str]) -> None:
    _, address = path_socket
    await asyncio.wait_for(Notifier(address).keep_watchdog(), 1)
