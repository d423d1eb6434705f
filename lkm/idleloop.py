"""An event loop that tells its listeners when it runs out of work, for a server process's loop.

Why: the audit writer lingers so that many records share one fsync, but a linger is only worth its wait while
the loop is still producing records. Once the loop has nothing left to run (every request in flight waits for
its record, or for its caller), waiting longer gains no record and keeps those callers, and with them the next
requests of a closed-loop caller, waiting. Only the loop itself knows it has run out of work: asyncio polls its
selector without a timeout while callbacks are ready, and with one when it would otherwise sleep.

`IdleAwareLoop` polls once without waiting before such a sleep; when that finds nothing, it calls its idle
callbacks and then sleeps. A busy loop never pays for it (it never sleeps); an idle one pays one extra
`epoll_wait` per wake-up.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Callable

__all__ = ["IdleAwareLoop", "call_when_idle"]


class _IdleSignallingSelector(selectors.DefaultSelector):
    def __init__(self) -> None:
        super().__init__()
        self.idle_callbacks: list[Callable[[], None]] = []

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if self.idle_callbacks and (timeout is None or timeout > 0):
            ready: list[tuple[selectors.SelectorKey, int]] = super().select(0)
            if ready:
                return ready
            for callback in self.idle_callbacks:
                callback()
        result: list[tuple[selectors.SelectorKey, int]] = super().select(timeout)
        return result


class IdleAwareLoop(asyncio.SelectorEventLoop):
    """A selector event loop whose idle callbacks run on its thread each time it is about to wait for I/O with
    nothing else to do. A callback must be quick and must not raise."""

    def __init__(self) -> None:
        self._idle_selector = _IdleSignallingSelector()
        super().__init__(self._idle_selector)

    def call_when_idle(self, callback: Callable[[], None]) -> None:
        self._idle_selector.idle_callbacks.append(callback)


def call_when_idle(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> bool:
    """Registers `callback` if `loop` can tell when it is idle; False (and nothing registered) otherwise."""
    if isinstance(loop, IdleAwareLoop):
        loop.call_when_idle(callback)
        return True
    return False
