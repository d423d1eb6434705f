"""The load run counts what its window saw: every answer that arrives between its two CPU snapshots."""

from __future__ import annotations

import asyncio
import time

from lkm.bench.load import LoadPlan, run_load
from lkm.bench.requests import Endpoint

ANSWER_AFTER = 0.3


class _SlowRequests:
    """Plain GETs to a local server that answers each one `ANSWER_AFTER` seconds after it arrives."""

    keys_per_request = 1
    client_certificate = False

    def __init__(self, port: int) -> None:
        self.endpoint = Endpoint.parse(f"http://127.0.0.1:{port}/slow")

    def build(self, n: int, close: bool) -> tuple[bytes, int]:
        return b"GET /slow HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", n

    def check(self, index: int, body: bytes) -> bool:
        return body == b"ok"


async def _slow_server(connection: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
    reader, writer = connection
    try:
        while await reader.readuntil(b"\r\n\r\n"):
            await asyncio.sleep(ANSWER_AFTER)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def test_answers_count_when_they_arrive_in_the_window_whenever_they_were_sent() -> None:
    """Three connections, each answered 0.3 s after it asks, measured from 0.45 s to 1.05 s: the answers at 0.3 s
    arrive before the window (not counted), those at 0.6 s were sent before it and arrive inside (counted: their
    server's CPU from 0.45 s on is in the window, as a request still in flight at its end spends some inside
    too), those at 0.9 s count, and the window closes before 1.2 s."""
    server = await asyncio.start_server(lambda r, w: _slow_server((r, w)), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        started = time.perf_counter()
        result = await run_load(_SlowRequests(port), LoadPlan(concurrency=3, warmup=0.45, duration=0.6,
                                                              verify_every=1))
        elapsed = time.perf_counter() - started
    finally:
        server.close()
        await server.wait_closed()
    assert result.ok == result.verified == 6 and result.errors == 0, (result.ok, result.by_status, elapsed)
    assert len(result.latencies) == 6 and min(result.latencies) >= ANSWER_AFTER
    assert 0.55 <= result.seconds <= 0.75
