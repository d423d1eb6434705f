"""Giving memory back to the operating system after a burst of requests.

A flood of requests (hostile or not) leaves resident memory at its peak. Two things hold it: cyclic garbage
that waits for the collector's oldest generation (a connection whose request failed to parse stays alive with
its TLS state and buffers, through its exception's traceback, until then), and glibc's heap, into which the
freed buffers of tens of kilobytes go, fragmented, instead of back to the system. `MemoryReleaser` looks at
resident memory every few seconds; when it grew by more than a threshold since the last look that released
anything, it collects garbage and calls `malloc_trim`. Under steady load it does nothing, so the collector's
pause stays out of the unwrap latency's tail (see `lkm.serving`, `gc.freeze`). Elsewhere than glibc, trimming
is a no-op and only the collection runs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import time
from collections.abc import Callable
from pathlib import Path

# Growth of resident memory that triggers a release; far above what normal traffic moves it by.
RELEASE_THRESHOLD_BYTES = 32 * 1024 * 1024
MIN_INTERVAL_SECONDS = 10.0


def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim: Callable[[int], int] = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


_TRIM = _malloc_trim()
_PAGE = os.sysconf("SC_PAGE_SIZE")


def resident_bytes() -> int:
    """This process's resident memory (0 where /proc is not available)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


class MemoryReleaser:
    """Call `start()` once the server is up and `step()` every few seconds, on the event loop."""

    def __init__(self, threshold_bytes: int = RELEASE_THRESHOLD_BYTES, min_interval: float = MIN_INTERVAL_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold = threshold_bytes
        self.min_interval = min_interval
        self.clock = clock
        self.baseline = 0  # resident memory once started
        self._last_after = 0  # resident memory after the last release
        self._last_at = -min_interval
        self.releases = 0

    def start(self) -> None:
        self.baseline = self._last_after = resident_bytes()

    def step(self) -> int:
        """One look; returns the bytes given back (0 when nothing was done).

        Releases when resident memory is `threshold` above the baseline, and either grew by as much again since
        the last release or that release is `min_interval` old: a working set that is simply larger than at
        start-up costs a collection every `min_interval` at most.
        """
        now = resident_bytes()
        if now - self.baseline < self.threshold:
            return 0
        if now - self._last_after < self.threshold and self.clock() - self._last_at < self.min_interval:
            return 0
        gc.collect()
        if _TRIM is not None:
            _TRIM(0)
        after = resident_bytes()
        self._last_after, self._last_at = after, self.clock()
        self.releases += 1
        return max(0, now - after)
