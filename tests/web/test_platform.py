"""The platform's route, end to end over real TLS and Hawk, byte-exact to the contract."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time

import aiohttp
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from lkm.hawk import HawkCredential, sign_request
from lkm.hawk_credentials import mint_credential
from lkm.keys import KeyState, public_pkcs1_b64
from tests.conftest import OAEP_SHA1, PKCS1, VECTORS, Running, b64, vector_key, wrap

DECRYPT = "/key-management/v1/decrypt"
VECTOR_IDS = {"oaep-sha1": "3f0c8c1e-6a55-4a4e-9a0e-2b8f2f1f6d11", "pkcs1-v1_5": "8d6c1f0a-2b3e-4c5d-8e9f-0a1b2c3d4e5f"}


async def test_platform_plays_a_recording_end_to_end(running: Running) -> None:
    """Fetch the public key, wrap a fresh DEK, encrypt a recording, later unwrap over Hawk and play it."""
    record = running.create_key()
    reply = await running.native("reader").request("GET", f"/v1/keys/{record.id}")
    assert reply.status == 200
    registered = reply.body["public_key_pkcs1_b64"]
    assert registered.startswith("MIIBigKCAYEA") and len(registered) == 532
    public_der = base64.b64decode(registered)
    from lkm.keys import load_public_pkcs1

    dek = AESGCM.generate_key(bit_length=256)
    nonce = os.urandom(12)
    recording = os.urandom(4096)
    sealed = AESGCM(dek).encrypt(nonce, recording, None)
    wrapped = load_public_pkcs1(public_der).encrypt(dek, OAEP_SHA1)

    answer = await running.platform().decrypt(record.id, wrapped, user_id="5f0a8a2e-1111-4222-8333-444455556666")
    assert answer.status == 200
    assert set(answer.body) == {"body"}
    assert AESGCM(base64.b64decode(answer.body["body"])).decrypt(nonce, sealed, None) == recording
    audit = [line for line in running.audit_lines() if line.get("action") == "unwrap"]
    assert audit[-1]["platform_user_id"] == "5f0a8a2e-1111-4222-8333-444455556666"
    assert audit[-1]["outcome"] == "ok" and audit[-1]["key_id"] == record.id
    assert audit[-1]["actor"]["hawk_id"] == running.hawk.id
    assert base64.b64encode(dek).decode() not in json.dumps(running.audit_lines())


@pytest.mark.slow
@pytest.mark.parametrize("vector", VECTORS["vectors"], ids=lambda v: v["name"])
async def test_platform_sample_vectors(running: Running, vector: dict[str, str]) -> None:
    key_id = VECTOR_IDS[vector["name"]]
    private_key = vector_key(vector["name"])
    running.store.import_key(key_id, private_key, state=KeyState.RETIRED)
    reply = await running.platform().decrypt(key_id, base64.b64decode(vector["ciphertext_b64"]),
                                             pkcs1=vector["decryptType"] == "pkcs1")
    assert reply.status == 200, reply.body
    assert reply.body == {"body": vector["plaintext_b64"]}


async def test_decrypt_type_in_body_for_older_platforms(running: Running) -> None:
    record = running.create_key()
    wrapped = wrap(record, b"k" * 32, PKCS1)
    client = running.platform()
    body = json.dumps({"keypairId": record.id, "body": b64(wrapped), "decryptType": "pkcs1"}).encode()
    auth = sign_request(running.hawk, method="POST", resource=DECRYPT, host=client.host, port=client.port,
                        content_type="application/json", body=body)
    async with running.session.post(client.url, data=body, ssl=client.ssl,
                                    headers={"Authorization": auth, "Content-Type": "application/json"}) as resp:
        assert resp.status == 200
        assert await resp.json() == {"body": b64(b"k" * 32)}


async def test_options_answers_the_contract_body(running: Running) -> None:
    reply = await running.platform().options()
    assert reply.status == 200
    assert reply.headers["Allow"] == "POST, OPTIONS"
    assert reply.body == {"encryptBody": {"keypairId": None, "body": None, "decryptType": None},
                          "decryptResponse": {"body": "Decrypted Response"}}


async def test_options_needs_hawk(running: Running) -> None:
    async with running.session.options(running.platform().url, ssl=running.platform().ssl) as resp:
        assert resp.status == 401
        assert (await resp.json())["status"] == 401


async def _post_raw(running: Running, body: bytes, *, query: str = "", credential: HawkCredential | None = None,
                    content_type: str = "application/json",
                    **sign: object) -> tuple[int, dict[str, object], dict[str, str]]:
    client = running.platform()
    resource = DECRYPT + (f"?{query}" if query else "")
    auth = sign_request(credential or running.hawk, method="POST", resource=resource, host=client.host,
                        port=client.port, content_type=content_type, body=body, **sign)  # type: ignore[arg-type]
    async with running.session.post(client.url + (f"?{query}" if query else ""), data=body, ssl=client.ssl,
                                    headers={"Authorization": auth, "Content-Type": content_type}) as resp:
        return resp.status, await resp.json(), dict(resp.headers)


@pytest.mark.parametrize(("payload", "query"), [
    (b"not json", ""),
    (b"[1, 2]", ""),
    (json.dumps({"body": b64(b"x" * 384)}).encode(), ""),
    (json.dumps({"keypairId": "3f0c8c1e-6a55-4a4e-9a0e-2b8f2f1f6d11"}).encode(), ""),
    (json.dumps({"keypairId": "not-a-uuid", "body": b64(b"x" * 384)}).encode(), ""),
    (json.dumps({"keypairId": 7, "body": b64(b"x" * 384)}).encode(), ""),
    (json.dumps({"keypairId": "3f0c8c1e-6a55-4a4e-9a0e-2b8f2f1f6d11", "body": "***"}).encode(), ""),
    (json.dumps({"keypairId": "3f0c8c1e-6a55-4a4e-9a0e-2b8f2f1f6d11", "body": 12}).encode(), ""),
    (json.dumps({"keypairId": "3f0c8c1e-6a55-4a4e-9a0e-2b8f2f1f6d11", "body": b64(b"x" * 384)}).encode(), ""),
    (json.dumps({"keypairId": "3f0c8c1e-6a55-4a4e-9a0e-2b8f2f1f6d11", "body": b64(b"x" * 384)}).encode(),
     "decryptType=oaep256"),
])
@pytest.mark.slow
async def test_bad_input_is_400_in_the_sample_shape(running: Running, payload: bytes, query: str) -> None:
    record = running.create_key()
    before = running.store.get_key(record.id)
    status, body, _ = await _post_raw(running, payload, query=query)
    assert status == 400
    assert set(body) == {"message", "status"} and body["status"] == 400
    assert isinstance(body["message"], str) and body["message"]
    assert running.store.get_key(record.id) == before


async def test_wrong_ciphertext_length_is_400(running: Running) -> None:
    record = running.create_key()
    status, body, _ = await _post_raw(running, json.dumps({"keypairId": record.id, "body": b64(b"x" * 100)}).encode())
    assert status == 400 and "384" in str(body["message"])


@pytest.mark.slow
async def test_decryption_failures_answer_uniformly(running: Running) -> None:
    """Wrong key, tampered and random ciphertexts: one status, one body, no hint of the cause."""
    record = running.create_key()
    other = running.create_key(KeyState.RETIRED)
    good = wrap(record, b"d" * 32)
    tampered = bytearray(good)
    tampered[100] ^= 1
    cases = [wrap(other, b"d" * 32), bytes(tampered), os.urandom(384), b"\x00" * 384]
    answers = set()
    for ciphertext in cases:
        reply = await running.platform().decrypt(record.id, ciphertext)
        answers.add((reply.status, json.dumps(reply.body, sort_keys=True)))
    assert answers == {(400, json.dumps({"message": "decryption failed", "status": 400}, sort_keys=True))}


async def test_pkcs1_never_reveals_padding_validity(running: Running) -> None:
    record = running.create_key()
    valid = await running.platform().decrypt(record.id, wrap(record, b"p" * 32, PKCS1), pkcs1=True)
    assert valid.status == 200 and base64.b64decode(valid.body["body"]) == b"p" * 32
    for _ in range(5):
        # Below the modulus (leading zero byte), so only the padding is wrong.
        garbage = await running.platform().decrypt(record.id, b"\x00" + os.urandom(383), pkcs1=True)
        # Implicit rejection: a bad padding yields pseudo-random bytes, answered like any other unwrap.
        assert garbage.status == 200 and set(garbage.body) == {"body"}


async def test_unknown_key_is_400(running: Running) -> None:
    reply = await running.platform().decrypt("00000000-0000-4000-8000-000000000000", os.urandom(384))
    assert reply.status == 400 and reply.body["status"] == 400


async def test_uppercase_key_id_is_accepted(running: Running) -> None:
    record = running.create_key()
    reply = await running.platform().decrypt(record.id.upper(), wrap(record, b"u" * 32))
    assert reply.status == 200


async def test_two_live_credentials(running: Running) -> None:
    second = mint_credential(running.server.settings.platform.hawk.credentials_file, "second")  # type: ignore[arg-type]
    await running.server.refresh()
    record = running.create_key()
    for cred in (running.hawk, second):
        reply = await running.platform(cred).decrypt(record.id, wrap(record, b"z" * 32))
        assert reply.status == 200


@pytest.mark.parametrize(("how", "code"), [
    ("unknown_id", 401), ("bad_mac", 401), ("stale", 401), ("no_header", 401), ("tampered_body", 401),
])
async def test_hawk_failures(running: Running, how: str, code: int) -> None:
    record = running.create_key()
    body = json.dumps({"keypairId": record.id, "body": b64(wrap(record, b"h" * 32))}).encode()
    client = running.platform()
    cred = running.hawk
    headers = {"Content-Type": "application/json"}
    if how == "unknown_id":
        cred = HawkCredential(id="nobody", key=running.hawk.key)
    elif how == "bad_mac":
        cred = HawkCredential(id=running.hawk.id, key="wrong key")
    ts = int(time.time()) - 3600 if how == "stale" else None
    if how != "no_header":
        headers["Authorization"] = sign_request(cred, method="POST", resource=DECRYPT, host=client.host,
                                                port=client.port, content_type="application/json", body=body, ts=ts)
    if how == "tampered_body":
        body = body.replace(b'"keypairId"', b'"keypairId" ')
    async with running.session.post(client.url, data=body, headers=headers, ssl=client.ssl) as resp:
        assert resp.status == code
        payload = await resp.json()
        assert payload["status"] == 401 and payload["message"]
        assert "WWW-Authenticate" in resp.headers
        if how == "stale":
            assert 'error="Stale timestamp"' in resp.headers["WWW-Authenticate"]
            assert "tsm=" in resp.headers["WWW-Authenticate"]


async def test_replayed_request_is_refused(running: Running) -> None:
    record = running.create_key()
    body = json.dumps({"keypairId": record.id, "body": b64(wrap(record, b"r" * 32))}).encode()
    client = running.platform()
    auth = sign_request(running.hawk, method="POST", resource=DECRYPT, host=client.host, port=client.port,
                        content_type="application/json", body=body, nonce="fixed-nonce")
    statuses = []
    for _ in range(2):
        async with running.session.post(client.url, data=body, ssl=client.ssl,
                                        headers={"Authorization": auth, "Content-Type": "application/json"}) as r:
            statuses.append(r.status)
    assert statuses == [200, 401]


async def test_oversized_body_is_413(running: Running) -> None:
    body = b"{" + b" " * 70_000 + b"}"
    status, payload, _ = await _post_raw(running, body)
    assert status == 413 and payload["status"] == 413


async def test_request_id_header(running: Running) -> None:
    record = running.create_key()
    reply = await running.platform().decrypt(record.id, wrap(record, b"i" * 32))
    assert len(reply.headers["X-Request-Id"]) == 32
    assert running.audit_lines()[-1]["request_id"] == reply.headers["X-Request-Id"]


async def test_health_route_of_the_sample(running: Running) -> None:
    async with running.session.get(running.url("platform") + "/key-management/v1/health",
                                   ssl=running.platform().ssl) as resp:
        assert resp.status == 200 and await resp.text() == "OK"


async def test_unknown_path_and_wrong_method_in_the_sample_shape(running: Running) -> None:
    ssl = running.platform().ssl
    async with running.session.get(running.url("platform") + "/key-management/v1/nope", ssl=ssl) as resp:
        assert resp.status == 404 and await resp.json() == {"message": "Not Found", "status": 404}
        assert len(resp.headers["X-Request-Id"]) == 32
    async with running.session.get(running.url("platform") + "/key-management/v1/decrypt", ssl=ssl) as resp:
        assert resp.status == 405 and resp.headers["Allow"] == "POST, OPTIONS"
        assert await resp.json() == {"message": "Method Not Allowed", "status": 405}
    async with running.session.post(running.url("platform") + "/key-management/v1/health", ssl=ssl) as resp:
        assert resp.status == 405 and resp.headers["Allow"] == "GET, HEAD"


async def test_public_key_format(running: Running) -> None:
    record = running.create_key()
    text = public_pkcs1_b64(record.public_key_der)
    assert text.startswith("MIIBigKCAYEA") and len(text) == 532


async def test_plain_http_to_tls_port_fails(running: Running) -> None:
    url = running.url("platform").replace("https://", "http://") + DECRYPT
    with pytest.raises(aiohttp.ClientError):
        async with running.session.post(url, data=b"{}") as resp:
            await resp.read()


async def test_body_split_across_writes_is_read_whole(running: Running) -> None:
    record = running.create_key()
    body = json.dumps({"keypairId": record.id, "body": b64(wrap(record, b"s" * 32))}).encode()
    client = running.platform()
    auth = sign_request(running.hawk, method="POST", resource=DECRYPT, host=client.host, port=client.port,
                        content_type="application/json", body=body)

    async def pieces():  # type: ignore[no-untyped-def]
        yield body[:40]
        await asyncio.sleep(0.1)
        yield body[40:]

    async with running.session.post(client.url, data=pieces(), ssl=client.ssl,
                                    headers={"Authorization": auth, "Content-Type": "application/json"}) as resp:
        assert resp.status == 200, await resp.text()
        assert await resp.json() == {"body": b64(b"s" * 32)}


async def test_non_ascii_host_header_is_a_401_not_a_crash(running: Running) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", running.server.listeners["platform"].port,
                                                   ssl=running.platform().ssl, server_hostname="localhost")
    writer.write(b"OPTIONS " + DECRYPT.encode() + b" HTTP/1.1\r\nHost: a\xffb\r\n"
                 b'Authorization: Hawk id="x", ts="1", nonce="n", mac="m"\r\nContent-Length: 0\r\n\r\n')
    await writer.drain()
    status_line = await reader.readline()
    writer.close()
    assert status_line.split()[1] in (b"400", b"401")


async def test_deeply_nested_json_is_400(running: Running) -> None:
    status, body, _ = await _post_raw(running, b"[" * 50_000)
    assert status == 400 and body["status"] == 400
