"""Connections: keep-alive on every listener, idle timeouts, TLS session resumption, ECDSA certificates."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from lkm.bench.http import Connection, ResumingContext
from tests.conftest import Pki, Running, start_server


def _context(certs: Pki, who: str | None = None) -> ResumingContext:
    ctx = ResumingContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(certs.ca_file))
    if who is not None:
        cert, key = certs.client(who)
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


def _get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()


async def _open(running: Running, listener: str, ctx: ssl.SSLContext | None) -> Connection:
    return await Connection.open("localhost", running.server.listeners[listener].port, ctx)


async def test_every_listener_keeps_connections_alive(running: Running) -> None:
    probes = {"platform": ("/key-management/v1/health", _context(running.certs)),
              "native": ("/v1/keys", _context(running.certs, "reader")),
              "ops": ("/healthz", None)}
    for listener, (path, ctx) in probes.items():
        conn = await _open(running, listener, ctx)
        try:
            for _ in range(3):
                reply = await conn.exchange(_get(path))
                assert reply.status == 200, (listener, reply.body)
                assert reply.keep_alive, listener
            assert not conn.closed
        finally:
            await conn.wait_closed()


async def test_native_identity_survives_session_resumption(running: Running) -> None:
    ctx = _context(running.certs, "reader")
    first = await _open(running, "native", ctx)
    try:
        assert (await first.exchange(_get("/v1/keys"))).status == 200
        first.remember_session(ctx)  # TLS 1.3 tickets arrive after the handshake: after an answer they are here
    finally:
        await first.wait_closed()
    second = await _open(running, "native", ctx)
    try:
        assert second.ssl_object is not None and second.ssl_object.session_reused
        reply = await second.exchange(_get("/v1/keys"))
        assert reply.status == 200, reply.body  # the client certificate is part of the resumed session
        assert json.loads(reply.body)["keys"] == []
    finally:
        await second.wait_closed()


async def test_platform_listener_resumes_sessions(running: Running) -> None:
    ctx = _context(running.certs)
    reused = []
    for _ in range(3):
        conn = await _open(running, "platform", ctx)
        try:
            assert (await conn.exchange(_get("/key-management/v1/health"))).status == 200
            assert conn.ssl_object is not None
            reused.append(conn.ssl_object.session_reused)
            conn.remember_session(ctx)
        finally:
            await conn.wait_closed()
    assert reused == [False, True, True]


@pytest.mark.slow
async def test_idle_connections_are_closed_after_keep_alive_seconds(
        tmp_path: Path, certs: Pki, config_factory: Callable[..., Path]) -> None:
    async with start_server(tmp_path, certs, config_factory(**{"limits.keep_alive_seconds": 1})) as running:
        conn = await _open(running, "platform", _context(certs))
        try:
            assert (await conn.exchange(_get("/key-management/v1/health"))).status == 200
            for _ in range(100):  # the server closes an idle connection after about a second
                if conn.closed:
                    break
                await asyncio.sleep(0.1)
            assert conn.closed
        finally:
            await conn.wait_closed()


def test_test_and_dev_certificates_are_ecdsa(certs: Pki) -> None:
    # A full handshake with an ECDSA P-256 certificate costs the server a tenth of an RSA-3072 one.
    cert = x509.load_pem_x509_certificate((certs.dir / "server.pem").read_bytes())
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
