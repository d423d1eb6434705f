"""The native API behind mutual TLS: who gets in, what each role may do, and bad input."""

from __future__ import annotations

import base64
import json
import os
import ssl

import aiohttp
import pytest

from lkm.client import client_ssl_context
from lkm.keys import KeyState, load_public_pkcs1
from tests.conftest import OAEP_SHA1, OAEP_SHA256, PKCS1, Running, b64, wrap


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


async def _tls_failure(running: Running, ctx: ssl.SSLContext) -> None:
    with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionError)):
        async with running.session.get(running.url("native") + "/v1/keys", ssl=ctx) as resp:
            await resp.read()


async def test_no_client_certificate_is_refused(running: Running) -> None:
    await _tls_failure(running, client_ssl_context(running.certs.ca_file))


async def test_certificate_from_another_ca_is_refused(running: Running) -> None:
    cert, key = running.certs.client("other_ca")
    await _tls_failure(running, client_ssl_context(running.certs.ca_file, cert, key))


async def test_expired_certificate_is_refused(running: Running) -> None:
    cert, key = running.certs.client("expired")
    await _tls_failure(running, client_ssl_context(running.certs.ca_file, cert, key))


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


async def test_ops_health_and_readiness(running: Running) -> None:
    running.create_key()
    await running.server.update_readiness(force_canary=True)
    async with running.session.get(running.url("ops") + "/healthz") as resp:
        assert resp.status == 200
    async with running.session.get(running.url("ops") + "/readyz") as resp:
        body = await resp.json()
        assert resp.status == 200, body
        assert body["ready"] is True
        assert set(body["checks"]) == {"keystore", "active_key", "certificates", "audit", "canary"}


async def test_a_native_only_server(tmp_path, certs, config_factory) -> None:  # type: ignore[no-untyped-def]
    from lkm.config import load_settings
    from lkm.server import LkmServer

    server = LkmServer(load_settings(config_factory(platform={"enabled": False})))
    await server.start()
    try:
        assert set(server.listeners) == {"native", "ops"}
        assert server.store is not None
        record = server.store.create_key(state=KeyState.ACTIVE)
        async with aiohttp.ClientSession() as session:
            cert, key = certs.client("admin")
            from lkm.client import NativeClient

            native = NativeClient(session, server.url("native"), client_ssl_context(certs.ca_file, cert, key))
            reply = await native.unwrap(record.id, wrap(record, b"n" * 32))
            assert reply.status == 200 and reply.body["key"] == b64(b"n" * 32)
    finally:
        await server.stop()
