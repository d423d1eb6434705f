"""Which worker process takes a new platform connection: the one with the fewest open, within a bounded wait.

Every worker listens on the same inherited socket, and the kernel wakes them all for a waiting connection;
whichever calls accept() first takes it. The platform keeps its connections alive for long, so who took a burst
of connections decides for minutes which cores do the work: 16 connections opened together were held 10 to 6
or 11 to 5 by two workers, and the busier worker's core saturated while the other idled. So each worker
publishes how many platform connections it has open on a small board the supervisor shares with them (one
64-bit counter per worker slot, in a file mapped by every worker) and leaves a new connection to a worker
with fewer. It leaves it for `DEFER_SECONDS` at most: a worker that is stopped, wedged or just busy must not
keep connections waiting, so after that the connection is taken anyway.
"""

from __future__ import annotations

import mmap
import os
import time
from pathlib import Path

__all__ = ["DEFER_SECONDS", "EMPTY", "ConnectionBoard"]

DEFER_SECONDS = 0.02
"""How long a worker leaves a waiting connection to a less busy one before it takes it itself."""
EMPTY = -1
"""A slot without a worker (not started yet, or exited): it takes no connection, so nobody waits for it."""
_COUNTER = 8  # bytes per slot: one signed 64-bit counter, written whole


class ConnectionBoard:
    """The open platform connections of every worker; each worker writes its own slot and reads the others."""

    def __init__(self, path: Path, slot: int) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            self._map = mmap.mmap(fd, 0)
        finally:
            os.close(fd)
        self.counts = memoryview(self._map).cast("q")
        self.slot = slot
        self.counts[slot] = 0
        self._waiting_since: float | None = None
        self._others_then = 0  # the other workers' open connections when the wait began

    @staticmethod
    def create(path: Path, slots: int) -> None:
        """The supervisor's side: a board with `slots` empty slots, readable by its own user only."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, EMPTY.to_bytes(_COUNTER, "little", signed=True) * slots)
        finally:
            os.close(fd)

    @staticmethod
    def vacate(path: Path, slot: int) -> None:
        """The supervisor's side, when the worker in `slot` exited: nobody leaves connections to it any more.
        Never raises: a board that cannot be written costs at most DEFER_SECONDS per connection, while an
        error here would stop the slot from being refilled."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        except OSError:
            return
        try:
            os.pwrite(fd, EMPTY.to_bytes(_COUNTER, "little", signed=True), slot * _COUNTER)
        except OSError:
            pass
        finally:
            os.close(fd)

    def note(self, open_connections: int) -> None:
        self.counts[self.slot] = open_connections

    def leave_to_another(self, open_connections: int, now: float | None = None) -> bool:
        """Whether to leave the waiting connection to a worker with fewer open: True while one exists and this
        worker has not left connections waiting for `DEFER_SECONDS` already."""
        self.counts[self.slot] = open_connections
        fewer = any(0 <= count < open_connections for count in self.counts)
        if not fewer:
            self._waiting_since = None
            return False
        now = time.monotonic() if now is None else now
        # More connections elsewhere than when this wait began: another worker took that connection, and this
        # one is the next (a stopped worker's count never grows, so DEFER_SECONDS still bounds every wait).
        others = sum(count for slot, count in enumerate(self.counts) if slot != self.slot and count > 0)
        if self._waiting_since is None or others > self._others_then:
            self._waiting_since, self._others_then = now, others
        if now - self._waiting_since < DEFER_SECONDS:
            return True
        self._waiting_since = None  # waited long enough: this worker takes it
        return False

    def close(self) -> None:
        self.counts.release()
        self._map.close()
