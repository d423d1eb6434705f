"""Connection admission attacked over real sockets from several loopback addresses: allow-lists, caps, proxies."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lkm.client import client_ssl_context
from lkm.config import ListenSettings
from lkm.memory import RELEASE_THRESHOLD_BYTES
from lkm.metrics import RefusalReason
from lkm.web.connections import ConnectionGuard, LogThrottle, parse_address
from tests.conftest import Pki, Running, pooled_key, start_server
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


# --- the whole process under a slow-body flood, with few file descriptors ---------------------------------------

FD_LIMIT = 128
SLOW_DEADLINE = 2.0


def spawn_with_fd_limit(config: Path, log: Any) -> Any:
    import resource
    import subprocess
    import sys

    def limit() -> None:  # soft = hard: lkm has nothing to raise
        resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))

    return subprocess.Popen([sys.executable, "-m", "lkm", "serve", "-c", str(config)], stdout=subprocess.DEVNULL,
                            stderr=log, preexec_fn=limit)  # noqa: PLW1509 - only setrlimit


async def hold_slow_body(port: int, tls: ssl.SSLContext, source: str, head: bytes) -> float | None:
    """One slow-body connection: headers, one byte, then silence. How long until the server closed it."""
    try:
        reader, writer = await connect(port, tls, source=source)
    except (ConnectionError, ssl.SSLError, OSError):
        return None  # refused at accept
    try:
        writer.write(head + b"{")
        await writer.drain()
        _, took = await read_until_closed(reader, within=30)
        return took
    except (ConnectionError, ssl.SSLError, OSError):
        return None
    finally:
        writer.close()


@pytest.mark.slow
@pytest.mark.long(5)
async def test_slow_bodies_against_few_descriptors_leave_unwraps_and_readyz_working(
        tmp_path: Path, certs: Pki) -> None:
    import json
    import os

    import aiohttp

    from lkm.bench.spawn import free_port, stop_child
    from lkm.client import PlatformClient
    from lkm.config import load_settings
    from lkm.hawk_credentials import mint_credential
    from lkm.keys import KeyState
    from lkm.keystore.open import open_keystore
    from tests.conftest import base_config, wrap, write_config

    ports = {name: free_port() for name in ("platform", "native", "ops")}
    config = base_config(tmp_path, certs)
    for name, port in ports.items():
        config[name]["listen"] = {"host": "127.0.0.1", "port": port, "request_timeout": SLOW_DEADLINE}
    # The platform listener's caps keep its connections well inside the descriptor limit; the native one has
    # none that bind, so a flood of unfinished TLS handshakes there runs the whole process out of descriptors.
    config["platform"]["listen"].update(max_connections=80, max_connections_per_client=16)
    config["native"]["listen"].update(max_connections=5000, max_connections_per_client=5000)
    config["logging"]["level"] = "info"
    path = write_config(tmp_path, config)
    settings = load_settings(path)
    store = open_keystore(settings.keystore)
    record = pooled_key(store, KeyState.ACTIVE)
    store.close()
    assert settings.platform.hawk.credentials_file is not None
    credential = mint_credential(settings.platform.hawk.credentials_file, "platform-test")
    log = tmp_path / "server.log"
    log_file = log.open("wb")
    child = spawn_with_fd_limit(path, log_file)
    tls = client_ssl_context(certs.ca_file)
    session = aiohttp.ClientSession()
    try:
        async def ready() -> int:
            try:
                async with session.get(f"http://127.0.0.1:{ports['ops']}/readyz") as reply:
                    return reply.status
            except aiohttp.ClientError:
                return 0

        for _ in range(400):
            if await ready() == 200:
                break
            assert child.poll() is None, log.read_text()[-2000:]
            await asyncio.sleep(0.05)
        platform = PlatformClient(session, f"https://localhost:{ports['platform']}/key-management/v1/decrypt",
                                  credential, tls)

        async def unwrap_ok() -> bool:
            secret = os.urandom(32)
            reply = await platform.decrypt(record.id, wrap(record, secret))
            return reply.status == 200 and reply.body["body"] == __import__("base64").b64encode(secret).decode()

        head = platform_head(credential, ports["platform"], content_length=60000)
        # Phase 1: 300 slow bodies from four addresses, more than the process has descriptors.
        attack = [asyncio.create_task(hold_slow_body(ports["platform"], tls, f"127.0.0.{2 + i % 4}", head))
                  for i in range(300)]
        await asyncio.sleep(0.5)
        fds_during = len(os.listdir(f"/proc/{child.pid}/fd"))
        served = [await unwrap_ok() for _ in range(10)]
        readyz = [await ready() for _ in range(5)]
        cut_after = [t for t in await asyncio.gather(*attack) if t is not None]
        assert all(served) and readyz == [200] * 5
        assert cut_after and max(cut_after) < SLOW_DEADLINE + 2.0
        assert fds_during < FD_LIMIT

        # Phase 2: 400 connections that never finish TLS run the process out of descriptors.
        flood = []
        for _ in range(400):
            try:
                flood.append(await asyncio.open_connection("127.0.0.1", ports["native"], local_addr=("127.0.0.7", 0)))
            except OSError:
                break
        await asyncio.sleep(0.5)
        for _, writer in flood:
            writer.close()
        await asyncio.sleep(SLOW_DEADLINE)
        assert child.poll() is None
        assert [await unwrap_ok() for _ in range(5)] == [True] * 5 and await ready() == 200

        async with session.get(f"http://127.0.0.1:{ports['ops']}/metrics") as reply:
            text = await reply.text()
        assert metric_value(text, "lkm_connections_refused_total", listener="platform", reason="client_full") > 0
        assert metric_value(text, "lkm_connections_timed_out_total", listener="platform") > 0
        assert metric_value(text, "lkm_http_requests_total", status="500") == 0
        lines = log.read_text().splitlines()
        out_of_fds = [line for line in lines if "out of file descriptors" in line]
        assert not any("out of system resource" in line for line in lines)
        assert metric_value(text, "lkm_connections_refused_total", reason="no_descriptors") > len(out_of_fds)
        assert 1 <= len(out_of_fds) <= 3
        assert not [line for line in lines if '"level":"error"' in line and "descriptors" not in line]
        print(json.dumps({"fds_during_phase1": fds_during, "slow_cut_after_max_s": round(max(cut_after), 2),
                          "refused": {r: metric_value(text, "lkm_connections_refused_total", reason=r)
                                      for r in RefusalReason},
                          "out_of_fd_log_lines": len(out_of_fds), "log_bytes": len("\n".join(lines))}))
    finally:
        await session.close()
        stop_child(child, 20)
        log_file.close()
        print(log.read_text()[-3000:])


# --- memory after a flood of hostile requests ---------------------------------------------------------------------

def rss_kib(pid: int) -> int:
    """The resident memory of a server: its supervisor and every worker process under it."""
    from lkm.bench.cpu import process_tree

    total = 0
    for member in process_tree(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    assert total, "no VmRSS"
    return total


async def hostile(port: int, tls: ssl.SSLContext, payload: bytes, source: str) -> None:
    try:
        reader, writer = await connect(port, tls, source=source)
    except (ConnectionError, ssl.SSLError, OSError):
        return
    try:
        writer.write(payload)
        await writer.drain()
        await read_until_closed(reader, within=5)
    except (ConnectionError, ssl.SSLError, OSError, TimeoutError):
        pass
    finally:
        writer.close()


@pytest.mark.slow
@pytest.mark.long(11)
async def test_resident_memory_returns_within_a_bound_after_a_hostile_flood(tmp_path: Path, certs: Pki) -> None:
    import random

    from lkm.bench.spawn import free_port, stop_child
    from lkm.hawk import HawkCredential
    from tests.conftest import base_config, write_config

    ports = {name: free_port() for name in ("platform", "native", "ops")}
    config = base_config(tmp_path, certs)
    for name, port in ports.items():
        config[name]["listen"] = {"host": "127.0.0.1", "port": port, "request_timeout": 1.0}
    config["limits"] = {**config.get("limits", {}), "keep_alive_seconds": 1}  # answered floods close soon
    (tmp_path / "hawk.json").write_text('{"version": 1, "credentials": []}')
    config["platform"]["hawk"] = {"credentials_file": str(tmp_path / "hawk.json")}
    path = write_config(tmp_path, config)
    log = (tmp_path / "server.log").open("wb")
    import subprocess
    import sys
    child = subprocess.Popen([sys.executable, "-m", "lkm", "serve", "-c", str(path)],  # noqa: ASYNC220
                             stdout=subprocess.DEVNULL, stderr=log)
    tls = client_ssl_context(certs.ca_file)
    port = ports["platform"]
    try:
        for _ in range(400):
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", ports["ops"])
                writer.close()
                break
            except OSError:
                await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)
        stranger = HawkCredential("intruder", "not-a-key")
        body = b'{"keypairId": "x", "body": "' + b"A" * 60000 + b'"}'
        payloads = [
            platform_head(stranger, port, content_length=len(body)) + body,  # unknown id, big body
            MALFORMED_NUL,
            b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"B" * 60000 + b"\r\n\r\n",
            platform_head(stranger, port, content_length=60000) + b"{",  # slow body
        ]
        before = rss_kib(child.pid)
        peak = before
        rounds, per_round = 6, 200
        for i in range(rounds):
            await asyncio.gather(*(hostile(port, tls, random.choice(payloads), f"127.0.1.{1 + j % 50}")
                                   for j in range(per_round)))
            peak = max(peak, rss_kib(child.pid))
            assert child.poll() is None, i
        after = peak
        for _ in range(60):  # the server gives memory back within seconds of the burst
            await asyncio.sleep(0.5)
            after = rss_kib(child.pid)
            if after - before < RELEASE_THRESHOLD_BYTES // 1024:
                break
        print({"requests": rounds * per_round, "rss_before_mib": round(before / 1024, 1),
               "rss_peak_mib": round(peak / 1024, 1), "rss_after_mib": round(after / 1024, 1)})
        assert after - before < RELEASE_THRESHOLD_BYTES // 1024, (before, peak, after)
    finally:
        stop_child(child, 20)
        log.close()


MALFORMED_NUL = (b"POST /key-management/v1/decrypt HTTP/1.1\r\nHost: localhost\r\n"
                 b"PureCloud-User-Id: \x00\r\nContent-Length: 0\r\n\r\n")
