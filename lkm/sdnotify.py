"""systemd's readiness protocol (sd_notify) in a few lines, so that lkm needs no libsystemd binding.

With `Type=notify` (or `notify-reload`) systemd passes a datagram socket in NOTIFY_SOCKET and waits for
READY=1 before it calls the unit started: dependants and `systemctl start` then wait for lkm to have opened
its key store and listeners, not merely for the process to exist. RELOADING=1 (with MONOTONIC_USEC, which
`Type=notify-reload` requires) and STOPPING=1 let `systemctl status` tell those phases apart, and the watchdog
pings let systemd restart a process whose event loop is stuck. Without NOTIFY_SOCKET (a shell, a container,
the tests) every call does nothing, so callers never need to ask where they run.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def _socket_address(value: str) -> str | bytes | None:
    """A path socket, or an abstract one ('@name', bytes with a leading NUL); anything else (vsock:) unused."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    return None


def _watchdog_usec(environ: Mapping[str, str]) -> int | None:
    """WATCHDOG_USEC when it is meant for this process: systemd sets WATCHDOG_PID to say whose it is."""
    pid = environ.get("WATCHDOG_PID")
    if pid is not None and pid != str(os.getpid()):
        return None
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec if usec > 0 else None


@dataclass(frozen=True)
class Notifier:
    """Where systemd listens, and the watchdog timeout it expects; both None outside systemd."""

    address: str | bytes | None = None
    watchdog_usec: int | None = None

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] | None = None, *, unset: bool = True) -> Notifier:
        """Read the variables once; unset them so that worker processes do not inherit them.

        Only the main process may notify (systemd's default NotifyAccess=main ignores the others), and a
        worker that read WATCHDOG_USEC would ping for a process it is not.
        """
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        notifier = cls(_socket_address(raw) if raw else None, _watchdog_usec(env))
        if unset:
            for name in _VARIABLES:
                env.pop(name, None)
        return notifier

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *assignments: str) -> bool:
        """Send one datagram of NAME=value lines; False when there is no socket or systemd did not take it.

        The socket is non-blocking: a full queue loses the message rather than stalling the event loop, and a
        lost READY=1 shows as a start time-out in systemd, which is the honest outcome.
        """
        if self.address is None or not assignments:
            return False
        message = "\n".join(assignments).encode()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)
            try:
                sock.sendto(message, self.address)
            except OSError:
                return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Start-up or a reload finished: the service accepts requests with its current settings."""
        return self.notify("READY=1", *([f"STATUS={_one_line(status)}"] if status else []))

    def reloading(self) -> bool:
        """A reload began; ready() ends it. MONOTONIC_USEC tells systemd which reload request this answers."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def status(self, text: str) -> bool:
        """Free text that `systemctl status` shows on its Status: line."""
        return self.notify(f"STATUS={_one_line(text)}")

    def watchdog(self) -> bool:
        """Tell systemd the process is alive; without WatchdogSec= systemd ignores it."""
        return self.notify("WATCHDOG=1")

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between pings: half the timeout, as systemd advises, or None without a watchdog."""
        if self.watchdog_usec is None or self.address is None:
            return None
        return self.watchdog_usec / 2_000_000

    async def keep_watchdog(self) -> None:
        """Ping from the event loop until cancelled: a loop blocked for the whole timeout stops the pings."""
        interval = self.watchdog_interval
        if interval is None:
            return
        while True:
            self.watchdog()
            await asyncio.sleep(interval)


def _one_line(text: str) -> str:
    """A newline would start a new assignment, so a status text could forge READY=1 or others."""
    return " ".join(text.split())
