"""The idle-aware event loop: its callbacks run when it would wait for I/O, never while work is ready."""

from __future__ import annotations

import asyncio
import socket

from lkm.idleloop import call_when_idle
from tests.conftest import run_on_idle_aware_loop


def test_idle_callbacks_run_only_when_the_loop_runs_out_of_work() -> None:
    idle_calls: list[int] = []
    steps = 0

    async def scenario() -> None:
        nonlocal steps
        loop = asyncio.get_running_loop()
        assert call_when_idle(loop, lambda: idle_calls.append(steps))
        await asyncio.sleep(0.01)  # whatever start-up left: the loop idles once at least
        idle_calls.clear()
        done = loop.create_future()

        def step() -> None:  # 200 callbacks, each scheduling the next: always work ready
            nonlocal steps
            steps += 1
            if steps < 200:
                loop.call_soon(step)
            else:
                done.set_result(None)
        loop.call_soon(step)
        await done
        assert idle_calls == []
        # Waiting for a socket: idle, and woken by the data all the same.
        left, right = socket.socketpair()
        with left, right:
            left.setblocking(False)
            reader, writer = await asyncio.open_connection(sock=left)
            # Data already there when the loop would wait: it is read, the loop never idled.
            right.send(b"w")
            assert await reader.read(1) == b"w"
            assert idle_calls == []
            # No data yet: the loop idles, and the data wakes it all the same.
            loop.call_later(0.05, right.send, b"x")
            assert await reader.read(1) == b"x"
            writer.close()
            await writer.wait_closed()
        assert idle_calls and set(idle_calls) == {200}

    run_on_idle_aware_loop(scenario)


async def test_another_loop_takes_no_idle_callback() -> None:
    assert not call_when_idle(asyncio.get_running_loop(), lambda: None)
