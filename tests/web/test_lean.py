"""The platform listener's own HTTP/1.1 over real TLS: partial reads, keep-alive, pipelining, framing limits."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os

from lkm.client import client_ssl_context
from lkm.hawk import sign_request
from tests.conftest import Running, b64, wrap
from tests.rawhttp import RawReply, connect, exchange, parse_reply, platform_head

DECRYPT = "/key-management/v1/decrypt"


def decrypt_request(running: Running, port: int, secret: bytes, *, extra: bytes = b"") -> bytes:
    record = running.create_key()
    body = json.dumps({"keypairId": record.id, "body": b64(wrap(record, secret))}).encode()
    auth = sign_request(running.hawk, method="POST", resource=DECRYPT, host="localhost", port=port,
                        content_type="application/json", body=body)
    return (f"POST {DECRYPT} HTTP/1.1\r\nHost: localhost:{port}\r\nContent-Type: application/json\r\n"
            f"Authorization: {auth}\r\nContent-Length: {len(body)}\r\n").encode() + extra + b"\r\n" + body


async def read_reply(reader: asyncio.StreamReader) -> RawReply:
    """One answer off a kept-alive connection, framed by its Content-Length."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    length = int(parse_reply(head).headers["content-length"])
    return parse_reply(head + await reader.readexactly(length))


async def open_platform(running: Running) -> tuple[int, asyncio.StreamReader, asyncio.StreamWriter]:
    port = running.server.listeners["platform"].port
    reader, writer = await connect(port, client_ssl_context(running.certs.ca_file))
    return port, reader, writer


async def test_a_request_split_byte_by_byte_is_served(running: Running) -> None:
    port, reader, writer = await open_platform(running)
    for byte in decrypt_request(running, port, b"b" * 32):
        writer.write(bytes([byte]))
        await writer.drain()
    reply = await read_reply(reader)
    writer.close()
    assert reply.status == 200 and reply.json() == {"body": b64(b"b" * 32)}


async def test_keep_alive_serves_several_requests_on_one_connection(running: Running) -> None:
    port, reader, writer = await open_platform(running)
    ids = set()
    for i in range(4):
        writer.write(decrypt_request(running, port, bytes([65 + i]) * 32))
        reply = await read_reply(reader)
        assert reply.status == 200 and reply.json() == {"body": b64(bytes([65 + i]) * 32)}
        assert "connection" not in reply.headers
        ids.add(reply.headers["x-request-id"])
    writer.close()
    assert len(ids) == 4
    assert not running.server.listeners["platform"].site.inflight  # each request left as it ended


async def test_a_pipelined_request_waits_for_the_first_answer(running: Running) -> None:
    port, reader, writer = await open_platform(running)
    health = b"GET /key-management/v1/health HTTP/1.1\r\nHost: localhost\r\n\r\n"
    writer.write(decrypt_request(running, port, b"p" * 32) + health + decrypt_request(running, port, b"q" * 32))
    first, second, third = [await read_reply(reader) for _ in range(3)]
    writer.close()
    assert first.json() == {"body": b64(b"p" * 32)}
    assert second.status == 200 and second.body == b"OK"
    assert third.json() == {"body": b64(b"q" * 32)}


async def test_content_length_edge_cases(running: Running) -> None:
    port = running.server.listeners["platform"].port
    tls = client_ssl_context(running.certs.ca_file)
    # Zero: an OPTIONS probe with no body at all.
    auth = sign_request(running.hawk, method="OPTIONS", resource=DECRYPT, host="localhost", port=port)
    reply = await exchange(port, tls, f"OPTIONS {DECRYPT} HTTP/1.1\r\nHost: localhost:{port}\r\n"
                                      f"Authorization: {auth}\r\nConnection: close\r\n\r\n".encode())
    assert reply.status == 200 and reply.headers["allow"] == "POST, OPTIONS"
    # Two Content-Lengths, a signed one, a negative one: 400 in the platform's shape, closed.
    for extra in (b"Content-Length: 3\r\n", b"Content-Length: +3\r\n"):
        raw = decrypt_request(running, port, b"c" * 32, extra=extra)
        reply = await exchange(port, tls, raw)
        assert reply.status == 400 and reply.headers["connection"] == "close"
        assert set(reply.json()) == {"message", "status"}
    # Over the body limit: 413 after the Hawk header check, without waiting for the body.
    reply = await exchange(port, tls, platform_head(running.hawk, port, content_length=10_000_000), within=5)
    assert reply.status == 413 and reply.json()["status"] == 413 and reply.headers["connection"] == "close"


async def test_transfer_codings_other_than_chunked_are_refused(running: Running) -> None:
    port = running.server.listeners["platform"].port
    tls = client_ssl_context(running.certs.ca_file)
    head = platform_head(running.hawk, port, content_length=2)
    smuggled = head.replace(b"Content-Length: 2\r\n", b"Transfer-Encoding: gzip, chunked\r\n")
    both = head.replace(b"\r\n\r\n", b"\r\nTransfer-Encoding: chunked\r\n\r\n")
    for raw in (smuggled, both):
        reply = await exchange(port, tls, raw + b"{}")
        assert reply.status == 411 and reply.headers["connection"] == "close"
        assert reply.json() == {"message": "only chunked or Content-Length bodies are accepted", "status": 411}


async def test_stopping_lets_a_request_in_flight_finish(running: Running) -> None:
    port, reader, writer = await open_platform(running)
    lock = os.open(f"{running.server.settings.audit.path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another writer holds the trail: the request waits for its record
        writer.write(decrypt_request(running, port, b"f" * 32))
        await writer.drain()
        await asyncio.sleep(0.3)
        stopping = asyncio.create_task(running.server.stop())
        await asyncio.sleep(0.3)
        assert not stopping.done()
    finally:
        os.close(lock)  # releases the flock
    reply = await read_reply(reader)
    assert reply.status == 200 and reply.json() == {"body": b64(b"f" * 32)}
    assert reply.headers["connection"] == "close"
    await asyncio.wait_for(stopping, 10)
