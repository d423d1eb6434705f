"""Connection admission attacked over real sockets from several loopback addresses: allow-lists, caps, proxies."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest

from lkm.client import client_ssl_context
from lkm.config import ListenSettings
from lkm.metrics import RefusalReason
from lkm.web.connections import ConnectionGuard, LogThrottle, parse_address
from tests.conftest import Pki, Running, start_server
from tests.rawhttp import connect, exchange, metric_value, parse_reply, platform_head, read_until_closed

HEALTH = b"GET /key-management/v1/health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"


async def metrics(running: Running) -> str:
    async with running.session.get(running.url("ops") + "/metrics") as reply:
        return await reply.text()


async def health_from(running: Running, source: str) -> int:
    port = running.server.listeners["platform"].port
    reader, writer = await connect(port, client_ssl_context(running.certs.ca_file), source=source)
    writer.write(HEALTH)
    raw, _ = await read_until_closed(reader, within=5)
    writer.close()
    return parse_reply(raw).status


async def test_a_peer_outside_allowed_networks_is_closed_before_tls(
        tmp_path: Path, certs: Pki, config_factory: Callable[..., Path]) -> None:
    config = config_factory(**{"platform.listen.allowed_networks": ["127.0.0.2/32", "10.0.0.0/8"]})
    async with start_server(tmp_path, certs, config) as running:
        assert await health_from(running, "127.0.0.2") == 200
        for _ in range(3):
            with pytest.raises((ConnectionError, ssl.SSLError, asyncio.IncompleteReadError, OSError)):
                await health_from(running, "127.0.0.1")
        text = await metrics(running)
        assert metric_value(text, "lkm_connections_refused_total", listener="platform", reason="not_allowed") == 3
        # Other listeners keep their own lists: the native one has none.
        assert metric_value(text, "lkm_connections_refused_total", listener="native") == 0


async def test_connection_caps_per_client_and_per_listener(
        tmp_path: Path, certs: Pki, config_factory: Callable[..., Path]) -> None:
    config = config_factory(**{"platform.listen.max_connections": 6,
                               "platform.listen.max_connections_per_client": 3})
    async with start_server(tmp_path, certs, config) as running:
        port = running.server.listeners["platform"].port
        tls = client_ssl_context(running.certs.ca_file)
        held = [await connect(port, tls, source="127.0.0.3") for _ in range(3)]
        with pytest.raises((ConnectionError, ssl.SSLError, OSError)):
            held.append(await connect(port, tls, source="127.0.0.3"))
        assert await health_from(running, "127.0.0.1") == 200  # another client still gets in
        held += [await connect(port, tls, source="127.0.0.4") for _ in range(3)]
        with pytest.raises((ConnectionError, ssl.SSLError, OSError)):
            await connect(port, tls, source="127.0.0.5")
        text = await metrics(running)
        assert metric_value(text, "lkm_connections_refused_total", reason="client_full") == 1
        assert metric_value(text, "lkm_connections_refused_total", reason="listener_full") == 1
        assert metric_value(text, "lkm_open_connections", listener="platform") == 6
        for _, writer in held:
            writer.close()
        # Closed connections give their places back.
        for _ in range(100):
            if metric_value(await metrics(running), "lkm_open_connections", listener="platform") == 0:
                break
            await asyncio.sleep(0.05)
        assert await health_from(running, "127.0.0.3") == 200


async def test_x_forwarded_for_is_believed_only_from_trusted_proxies(
        tmp_path: Path, certs: Pki, config_factory: Callable[..., Path]) -> None:
    config = config_factory(**{"platform.listen.trusted_proxies": ["127.0.0.6/32"]})
    async with start_server(tmp_path, certs, config) as running:
        port = running.server.listeners["platform"].port
        tls = client_ssl_context(running.certs.ca_file)
        head = platform_head(running.hawk, port, content_length=2, authorization='Hawk id="nobody"')
        extra = b"\r\nConnection: close\r\nX-Forwarded-For: 198.51.100.7, 127.0.0.6\r\n\r\n"
        forged = head.replace(b"\r\n\r\n", extra) + b"{}"
        for source in ("127.0.0.6", "127.0.0.1"):
            reader, writer = await connect(port, tls, source=source)
            writer.write(forged)
            raw, _ = await read_until_closed(reader, within=5)
            writer.close()
            assert parse_reply(raw).status == 401
        clients = [line.get("client") for line in running.audit_lines() if line.get("action") == "authenticate"]
        assert clients == ["198.51.100.7", "127.0.0.1"]


def test_client_address_walks_forwarded_for_from_the_right() -> None:
    import ipaddress
    settings = ListenSettings("127.0.0.1", 0, trusted_proxies=(ipaddress.ip_network("10.0.0.0/8"),))
    guard = ConnectionGuard("platform", settings, on_refused=lambda *_: None, on_open=lambda *_: None)
    assert guard.client_address("10.1.1.1", "203.0.113.9, 198.51.100.7, 10.2.2.2") == "198.51.100.7"
    assert guard.client_address("10.1.1.1", "10.3.3.3, 10.2.2.2") == "10.3.3.3"
    assert guard.client_address("10.1.1.1", "junk, 198.51.100.7") == "198.51.100.7"
    assert guard.client_address("10.1.1.1", "198.51.100.7, junk") == "10.1.1.1"
    assert guard.client_address("192.0.2.1", "198.51.100.7") == "192.0.2.1"  # not a trusted peer
    assert guard.client_address("10.1.1.1", None) == "10.1.1.1"
    assert parse_address("::ffff:10.0.0.1") == ipaddress.ip_address("10.0.0.1")
    refused: list[RefusalReason] = []
    assert guard.admit("10.1.1.1") is None
    guard.release("10.1.1.1")
    assert guard.open == 0 and not refused


def test_log_throttle_lets_one_line_through_per_interval() -> None:
    now = [100.0]
    throttle = LogThrottle(interval=1.0, clock=lambda: now[0])
    assert throttle.allow() == 0
    assert [throttle.allow() for _ in range(5)] == [None] * 5
    now[0] += 1.0
    assert throttle.allow() == 5


async def test_bad_config_values_are_refused(tmp_path: Path, certs: Pki, config_factory: Callable[..., Path]) -> None:
    from lkm.config import load_settings
    from lkm.errors import ConfigError
    for key, value in (("platform.listen.allowed_networks", ["10.0.0.1/8"]),
                       ("platform.listen.trusted_proxies", ["not-a-network"]),
                       ("platform.listen.max_connections_per_client", 0)):
        with pytest.raises(ConfigError, match=key.rsplit(".", 1)[1]):
            load_settings(config_factory(**{key: value}))


async def test_an_unauthenticated_request_never_costs_a_body_read(running: Running) -> None:
    """Unknown id or bad MAC: 401 right after the headers, connection closed, body never awaited."""
    port = running.server.listeners["platform"].port
    tls = client_ssl_context(running.certs.ca_file)
    bad = platform_head(running.hawk, port, content_length=60000).replace(b'id="platform-test"', b'id="intruder"')
    reply = await exchange(port, tls, bad + b"{", within=3)
    assert reply.status == 401 and reply.headers.get("connection") == "close"
    forged = platform_head(running.hawk, port, content_length=60000).replace(b'mac="', b'mac="AAAA')
    reply = await exchange(port, tls, forged + b"{", within=3)
    assert reply.status == 401 and reply.json()["message"]
