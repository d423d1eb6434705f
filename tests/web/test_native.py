"""The native API behind mutual TLS: who gets in, what each role may do, and bad input."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import socket
import ssl
from collections.abc import Awaitable, Callable

import pytest

from lkm.client import client_ssl_context
from lkm.keys import KeyState, load_public_pkcs1
from tests.conftest import OAEP_SHA1, OAEP_SHA256, PKCS1, Running, b64, eventually, wrap
from tests.lkmcli import lkm_here


async def test_list_and_get_keys(running: Running) -> None:
    record = running.create_key()
    reply = await running.native("reader").request("GET", "/v1/keys")
    assert reply.status == 200
    assert [k["id"] for k in reply.body["keys"]] == [record.id]
    assert reply.body["keys"][0]["state"] == "active"
    one = await running.native("reader").request("GET", f"/v1/keys/{record.id}")
    assert one.status == 200
    body = one.body
    assert body["public_key_pem"].startswith("-----BEGIN PUBLIC KEY-----")
    der = base64.b64decode(body["public_key_pkcs1_b64"])
    assert der == record.public_key_der
    jwk = body["public_key_jwk"]
    n = int.from_bytes(base64.urlsafe_b64decode(jwk["n"] + "=" * (-len(jwk["n"]) % 4)), "big")
    assert jwk["kty"] == "RSA" and jwk["kid"] == record.id and jwk["e"] == "AQAB"
    assert n == load_public_pkcs1(der).public_numbers().n


@pytest.mark.parametrize(("algorithm", "pad"), [
    ("RSA-OAEP-SHA1", OAEP_SHA1), ("RSA-OAEP-SHA256", OAEP_SHA256), ("RSA-PKCS1-V1_5", PKCS1)])
async def test_unwrap_each_algorithm(running: Running, algorithm: str, pad: object) -> None:
    record = running.create_key()
    secret = os.urandom(32)
    reply = await running.native("unwrapper").unwrap(record.id, wrap(record, secret, pad), algorithm)  # type: ignore[arg-type]
    assert reply.status == 200
    assert reply.body == {"id": record.id, "key": b64(secret)}


async def test_reader_cannot_unwrap(running: Running) -> None:
    record = running.create_key()
    reply = await running.native("reader").unwrap(record.id, wrap(record, b"x" * 32))
    assert reply.status == 403
    assert reply.body["error"]["code"] == "forbidden_role"
    assert reply.body["request_id"] == reply.headers["X-Request-Id"]


def _exchange(port: int, ctx: ssl.SSLContext) -> bytes:
    """One GET over a blocking TLS socket: the first bytes of the answer, b"" when the server hangs up."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(b"GET /v1/keys HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        return tls.recv(64)


async def _refusal(running: Running, ctx: ssl.SSLContext, caplog: pytest.LogCaptureFixture) -> ssl.SSLError:
    """The server-side handshake error for a client the native listener must refuse.

    The server's TLS stack closes the connection without an alert the client could read, so the reason is
    taken where it is decided: asyncio reports a failed server handshake (in debug mode) with the SSL error.
    The same listener then serves a good client, so a listener that is down cannot pass for a refusal.
    """
    port = running.server.listeners["native"].port
    loop = asyncio.get_running_loop()
    caplog.set_level(logging.DEBUG, logger="asyncio")
    loop.set_debug(True)
    try:
        try:
            answer = await asyncio.to_thread(_exchange, port, ctx)
        except (ssl.SSLEOFError, ConnectionResetError):  # TLS 1.2 clients see the hang-up in the handshake
            answer = b""
        assert answer == b"", "the listener answered a client it must refuse"
        await eventually(lambda: [r for r in caplog.records if r.name == "asyncio" and r.exc_info])
    finally:
        loop.set_debug(False)
    errors = [r.exc_info[1] for r in caplog.records if r.name == "asyncio" and r.exc_info]
    assert all(isinstance(e, ssl.SSLError) for e in errors)
    good = client_ssl_context(running.certs.ca_file, *running.certs.client("reader"))
    assert (await asyncio.to_thread(_exchange, port, good)).startswith(b"HTTP/1.1 200 ")
    error = errors[0]
    assert isinstance(error, ssl.SSLError)
    return error


async def test_no_client_certificate_is_refused(running: Running, caplog: pytest.LogCaptureFixture) -> None:
    error = await _refusal(running, client_ssl_context(running.certs.ca_file), caplog)
    assert error.reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE"


async def test_certificate_from_another_ca_is_refused(running: Running, caplog: pytest.LogCaptureFixture) -> None:
    cert, key = running.certs.client("other_ca")
    error = await _refusal(running, client_ssl_context(running.certs.ca_file, cert, key), caplog)
    assert isinstance(error, ssl.SSLCertVerificationError)
    assert error.verify_message == "unable to get local issuer certificate"


async def test_expired_certificate_is_refused(running: Running, caplog: pytest.LogCaptureFixture) -> None:
    cert, key = running.certs.client("expired")
    ctx = client_ssl_context(running.certs.ca_file, cert, key)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2  # refused inside the handshake on TLS 1.2 as well
    error = await _refusal(running, ctx, caplog)
    assert isinstance(error, ssl.SSLCertVerificationError)
    assert error.verify_message == "certificate has expired"


async def test_unlisted_identity_is_forbidden_and_audited(running: Running) -> None:
    record = running.create_key()
    client = running.native("unlisted")
    for method, path, payload in [("GET", "/v1/keys", None), ("GET", f"/v1/keys/{record.id}", None),
                                  ("POST", f"/v1/keys/{record.id}/unwrap",
                                   {"wrapped_key": b64(wrap(record, b"x" * 32)), "algorithm": "RSA-OAEP-SHA1"})]:
        reply = await client.request(method, path, payload)
        assert reply.status == 403
        assert reply.body["error"]["code"] == "unknown_client"
    denials = [e for e in running.audit_lines() if e.get("outcome") == "denied"]
    assert len(denials) == 3
    assert all(e["actor"]["name"] == "unlisted" for e in denials)
    assert not [e for e in running.audit_lines() if e.get("action") == "unwrap"]


async def test_fingerprint_and_san_rules(tmp_path, certs, config_factory) -> None:  # type: ignore[no-untyped-def]
    import hashlib

    from cryptography import x509

    from tests.conftest import start_server

    der = x509.load_pem_x509_certificate(certs.client("unlisted")[0].read_bytes()).public_bytes(
        __import__("cryptography.hazmat.primitives.serialization", fromlist=["Encoding"]).Encoding.DER)
    fingerprint = hashlib.sha256(der).hexdigest()
    path = config_factory(**{"native.clients": [{"name": "by-fp", "fingerprint": fingerprint,
                                                  "roles": ["read"]}]})
    async with start_server(tmp_path, certs, path) as running:
        reply = await running.native("unlisted").request("GET", "/v1/keys")
        assert reply.status == 200
        reply = await running.native("admin").request("GET", "/v1/keys")
        assert reply.status == 403


@pytest.mark.parametrize(("payload", "code"), [
    ({"wrapped_key": "@@@", "algorithm": "RSA-OAEP-SHA1"}, "invalid_base64"),
    ({"algorithm": "RSA-OAEP-SHA1"}, "invalid_base64"),
    ({"wrapped_key": b64(b"x" * 384), "algorithm": "RSA-OAEP-MD5"}, "unsupported_algorithm"),
    ({"wrapped_key": b64(b"x" * 10), "algorithm": "RSA-OAEP-SHA1"}, "invalid_ciphertext_length"),
    ({"wrapped_key": 42}, "invalid_base64"),
    ([1, 2, 3], "invalid_json"),
])
async def test_bad_unwrap_input(running: Running, payload: object, code: str) -> None:
    record = running.create_key()
    reply = await running.native("admin").request("POST", f"/v1/keys/{record.id}/unwrap", payload)
    assert reply.status == 400
    assert reply.body["error"]["code"] == code
    assert reply.body["error"]["message"]


async def test_malformed_json(running: Running) -> None:
    record = running.create_key()
    client = running.native("admin")
    async with running.session.post(client.base + f"/v1/keys/{record.id}/unwrap", data=b"{nope",
                                    ssl=client.ssl) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["code"] == "invalid_json"


async def test_unknown_and_invalid_ids(running: Running) -> None:
    client = running.native("admin")
    reply = await client.request("GET", "/v1/keys/00000000-0000-4000-8000-000000000000")
    assert reply.status == 404 and reply.body["error"]["code"] == "key_not_found"
    reply = await client.request("GET", "/v1/keys/not-a-uuid")
    assert reply.status == 400 and reply.body["error"]["code"] == "invalid_key_id"
    reply = await client.request("GET", "/v1/nothing-here")
    assert reply.status == 404 and reply.body["error"]["code"] == "not_found"


@pytest.mark.slow
async def test_decryption_failure_is_uniform(running: Running) -> None:
    record = running.create_key()
    other = running.create_key(KeyState.RETIRED)
    answers = set()
    for ciphertext in [wrap(other, b"a" * 32), os.urandom(384), b"\x00" * 384]:
        reply = await running.native("admin").unwrap(record.id, ciphertext)
        answers.add((reply.status, json.dumps(reply.body["error"], sort_keys=True)))
    assert answers == {(400, json.dumps({"code": "decryption_failed", "message": "decryption failed"},
                                        sort_keys=True))}


async def test_disabled_key_refuses_unwrap(running: Running) -> None:
    record = running.create_key()
    running.store.save_record(record.with_changes(state=KeyState.DISABLED))
    reply = await running.native("admin").unwrap(record.id, wrap(record, b"d" * 32))
    assert reply.status == 409 and reply.body["error"]["code"] == "key_disabled"


async def test_oversized_body(running: Running) -> None:
    record = running.create_key()
    client = running.native("admin")
    async with running.session.post(client.base + f"/v1/keys/{record.id}/unwrap", data=b"x" * 100_000,
                                    ssl=client.ssl) as resp:
        assert resp.status == 413


async def test_no_key_material_in_logs(running: Running, caplog: pytest.LogCaptureFixture) -> None:
    record = running.create_key()
    secret = os.urandom(32)
    caplog.set_level("DEBUG")
    reply = await running.native("admin").unwrap(record.id, wrap(record, secret))
    assert reply.status == 200
    text = caplog.text + json.dumps(running.audit_lines())
    assert b64(secret) not in text and secret.hex() not in text


@pytest.mark.slow
async def test_a_frozen_client_is_refused_on_every_native_route_within_its_denial_budget(running: Running) -> None:
    """`lkm freeze admin`: listing, reading, unwrapping, batches and administration all answer 403
    `caller_frozen`; a flood of them writes the bounded burst of denial records, not one per request."""
    record = running.create_key()
    await running.server.refresh()
    admin, reader = running.native("admin"), running.native("reader")
    assert (await admin.request("GET", "/v1/keys")).status == 200
    await asyncio.to_thread(lkm_here, "-c", str(running.config_path), "freeze", "admin", "--reason", "attack test")

    async def frozen() -> bool:
        return (await admin.request("GET", "/v1/keys")).status == 403
    assert await eventually_async(frozen)
    attempts = [("GET", "/v1/keys", None), ("GET", f"/v1/keys/{record.id}", None),
                ("POST", f"/v1/keys/{record.id}/unwrap", {"wrapped_key": b64(wrap(record, b"z" * 32))}),
                ("POST", "/v1/unwrap", {"items": [{"id": record.id, "wrapped_key": b64(wrap(record, b"z" * 32))}]}),
                ("POST", "/v1/keys", {"label": "while frozen"}), ("POST", "/v1/keys/rotate", {}),
                ("POST", f"/v1/keys/{record.id}/disable", {})]
    for method, path, payload in attempts:
        reply = await admin.request(method, path, payload)
        assert (reply.status, reply.body["error"]["code"]) == (403, "caller_frozen"), (method, path, reply.body)
    assert running.store.get_key(record.id).state is KeyState.ACTIVE and len(running.store.list_keys()) == 1
    assert (await reader.request("GET", "/v1/keys")).status == 200  # others are not touched

    flood = 60
    for _ in range(flood):
        assert (await admin.request("GET", "/v1/keys")).status == 403
    denials = [e for e in running.audit_lines() if e.get("error_code") == "caller_frozen"]
    sent = flood + len(attempts) + 1
    assert all((e["outcome"], e["actor"]["name"]) == ("denied", "admin") for e in denials)
    # The burst of 20, then at most 2 a second (before: one record per request, `sent` of them).
    assert 20 <= len(denials) < 20 + sent // 4 < sent, len(denials)
    await asyncio.to_thread(lkm_here, "-c", str(running.config_path), "unfreeze", "admin")

    async def served() -> bool:
        return (await admin.request("GET", "/v1/keys")).status == 200
    assert await eventually_async(served)


async def eventually_async(check: Callable[[], Awaitable[bool]], within: float = 15.0) -> bool:
    deadline = asyncio.get_running_loop().time() + within
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True
