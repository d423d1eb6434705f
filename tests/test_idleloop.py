"""The idle-aware event loop: its callbacks run when it would wait for I/O, never while work is ready."""

from __future__ import annotations

import asyncio
import socket

from lkm.idleloop import IdleAwareLoop, call_when_idle


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

    with asyncio.Runner(loop_factory=IdleAwareLoop) as runner:
        runner.run(scenario())


async def test_another_loop_takes_no_idle_callback() -> None:
    assert not call_when_idle(asyncio.get_running_loop(), lambda: None)


def test_a_callback_that_schedules_sooner_cuts_the_sleep() -> None:
    """The loop chose its sleep before the callback ran: a timer the callback sets sooner must still fire on time."""

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(0.01)  # start-up work done
        fired: asyncio.Future[float] = loop.create_future()
        armed: list[bool] = []

        def on_idle() -> float | None:
            if armed:
                return None
            armed.append(True)
            loop.call_later(0.01, lambda: fired.set_result(loop.time()))
            return 0.01

        loop.call_later(3, lambda: None)  # the loop's own next timer: it would sleep 3 s
        call_when_idle(loop, on_idle)
        started = loop.time()
        assert await fired - started < 1

    with asyncio.Runner(loop_factory=IdleAwareLoop) as runner:
        runner.run(asyncio.wait_for(scenario(), 10))
