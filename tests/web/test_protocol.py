"""Each connection's protocol, attacked over real sockets: the request deadline, abandoned requests, malformed HTTP."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lkm.client import client_ssl_context
from tests.conftest import Pki, Running, start_server
from tests.rawhttp import connect, exchange, metric_value, platform_head, read_until_closed

DEADLINE = 1.0


async def metrics(running: Running) -> str:
    async with running.session.get(running.url("ops") + "/metrics") as reply:
        return await reply.text()


@pytest.fixture
async def deadline_server(tmp_path: Path, certs: Pki, config_factory: Callable[..., Path]) -> Any:
    config = config_factory(**{"platform.listen.request_timeout": DEADLINE,
                               "native.listen.request_timeout": DEADLINE})
    async with start_server(tmp_path, certs, config) as handle:
        yield handle


@pytest.mark.slow
async def test_a_slow_body_is_cut_at_the_deadline(deadline_server: Running) -> None:
    """Headers with Content-Length 60000, then one byte: closed at the deadline, counted, never a 500."""
    running = deadline_server
    port = running.server.listeners["platform"].port
    tls = client_ssl_context(running.certs.ca_file)
    reader, writer = await connect(port, tls)
    writer.write(platform_head(running.hawk, port, content_length=60000) + b"{")
    await writer.drain()
    raw, took = await read_until_closed(reader, within=10 * DEADLINE)
    writer.close()
    assert raw == b"" and DEADLINE * 0.9 <= took < DEADLINE + 2.0
    text = await metrics(running)
    assert metric_value(text, "lkm_connections_timed_out_total", listener="platform") == 1
    assert metric_value(text, "lkm_http_requests_total", listener="platform", status="timeout") == 1
    assert metric_value(text, "lkm_http_requests_total", status="500") == 0


@pytest.mark.slow
async def test_slow_headers_and_a_silent_connection_are_cut_at_the_deadline(deadline_server: Running) -> None:
    running = deadline_server
    tls = client_ssl_context(running.certs.ca_file)
    cert, key = running.certs.client("admin")
    native_tls = client_ssl_context(running.certs.ca_file, cert, key)
    silent = await connect(running.server.listeners["platform"].port, tls)
    trickle = await connect(running.server.listeners["native"].port, native_tls)
    trickle[1].write(b"GET /v1/keys HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
    for reader, writer in (silent, trickle):
        raw, took = await read_until_closed(reader, within=10 * DEADLINE)
        writer.close()
        assert raw == b"" and took < DEADLINE + 2.0
    text = await metrics(running)
    assert metric_value(text, "lkm_connections_timed_out_total") == 2


@pytest.mark.slow
async def test_a_request_in_time_is_served_and_keep_alive_is_not_cut(deadline_server: Running) -> None:
    """The deadline covers arriving requests only: an idle keep-alive connection between requests is not cut."""
    running = deadline_server
    record = running.create_key()
    client = running.native("admin")
    assert (await client.request("GET", f"/v1/keys/{record.id}")).status == 200
    await asyncio.sleep(DEADLINE * 1.5)  # idle on the pooled connection, longer than the deadline
    assert (await client.request("GET", f"/v1/keys/{record.id}")).status == 200
    text = await metrics(running)
    assert metric_value(text, "lkm_connections_timed_out_total", listener="native") == 0


async def test_a_client_that_drops_mid_request_is_counted_apart_not_as_a_500(
        running: Running, caplog: pytest.LogCaptureFixture) -> None:
    record = running.create_key()
    cert, key = running.certs.client("admin")
    port = running.server.listeners["native"].port
    tls = client_ssl_context(running.certs.ca_file, cert, key)
    platform_port = running.server.listeners["platform"].port
    for _ in range(3):
        _, writer = await connect(port, tls)
        writer.write(f"POST /v1/keys/{record.id}/unwrap HTTP/1.1\r\nHost: localhost\r\n"
                     f"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"wrapped".encode())
        await writer.drain()
        writer.transport.abort()
        _, writer = await connect(platform_port, client_ssl_context(running.certs.ca_file))
        writer.write(platform_head(running.hawk, platform_port, content_length=500) + b"{")
        await writer.drain()
        writer.transport.abort()

    async def counted() -> float:
        return metric_value(await metrics(running), "lkm_http_requests_total", status="client_closed")

    for _ in range(100):
        if await counted() == 6:
            break
        await asyncio.sleep(0.05)
    text = await metrics(running)
    assert metric_value(text, "lkm_http_requests_total", status="client_closed") == 6
    assert metric_value(text, "lkm_http_requests_total", status="500") == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("lkm")]


MALFORMED = {
    "nul_in_header": b"POST /key-management/v1/decrypt HTTP/1.1\r\nHost: localhost\r\n"
                     b"PureCloud-User-Id: \x00secret-ish\r\nContent-Length: 0\r\n\r\n",
    "bad_request_line": b"GET /\x01evil HTTP/9.9 extra\r\nHost: localhost\r\n\r\n",
    "huge_header": b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"A" * 100_000 + b"\r\n\r\n",
    "bad_content_length": b"POST /v1/keys HTTP/1.1\r\nHost: localhost\r\nContent-Length: -5evil\r\n\r\n",
}


@pytest.mark.parametrize("attack", sorted(MALFORMED))
async def test_malformed_http_is_answered_in_each_listeners_shape_without_echo(
        running: Running, caplog: pytest.LogCaptureFixture, attack: str) -> None:
    caplog.set_level(logging.INFO, logger="lkm.web")
    cert, key = running.certs.client("admin")
    targets = {"platform": client_ssl_context(running.certs.ca_file),
               "native": client_ssl_context(running.certs.ca_file, cert, key), "ops": None}
    payload = MALFORMED[attack]
    for listener, tls in targets.items():
        reply = await exchange(running.server.listeners[listener].port, tls, payload)
        assert 400 <= reply.status < 500, (listener, reply.raw[:200])
        assert reply.headers.get("connection") == "close"
        assert reply.headers.get("content-type", "").startswith("application/json")
        body = reply.json()
        if listener == "platform":
            assert set(body) == {"message", "status"} and body["status"] == reply.status
        else:
            assert set(body) == {"error", "request_id"} and set(body["error"]) == {"code", "message"}
        for echoed in (b"secret-ish", b"evil", b"AAAA", b"\\x00"):
            assert echoed not in reply.body
    lines = [r for r in caplog.records if r.name == "lkm.web"]
    assert lines and all(r.levelno == logging.INFO and r.exc_info is None for r in lines)
    assert len(lines) <= len(targets)  # one line a second at most, per listener
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    text = await metrics(running)
    assert metric_value(text, "lkm_http_requests_total", status="500") == 0
