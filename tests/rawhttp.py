"""Raw HTTP/1.1 over TCP or TLS, for attacks no HTTP client library would send: slow, malformed, abandoned."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from dataclasses import dataclass
from typing import Any

from lkm.hawk import HawkCredential, sign_request


@dataclass
class RawReply:
    status: int
    headers: dict[str, str]
    body: bytes
    raw: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def parse_reply(raw: bytes) -> RawReply:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return RawReply(status, headers, body, raw)


async def connect(port: int, ssl_ctx: ssl.SSLContext | None, *, host: str = "127.0.0.1",
                  source: str | None = None) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(host, port, ssl=ssl_ctx, server_hostname="localhost" if ssl_ctx else None,
                                         local_addr=(source, 0) if source else None)


async def read_until_closed(reader: asyncio.StreamReader, within: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took."""
    started = time.monotonic()
    chunks = []
    async with asyncio.timeout(within):
        while True:
            try:
                chunk = await reader.read(65536)
            except (ConnectionResetError, ssl.SSLError):
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks), time.monotonic() - started


async def exchange(port: int, ssl_ctx: ssl.SSLContext | None, data: bytes, *, within: float = 10.0) -> RawReply:
    reader, writer = await connect(port, ssl_ctx)
    try:
        writer.write(data)
        await writer.drain()
        raw, _ = await read_until_closed(reader, within)
    finally:
        writer.close()
    return parse_reply(raw)


def platform_head(credential: HawkCredential, port: int, *, path: str = "/key-management/v1/decrypt",
                  content_length: int, authorization: str | None = None) -> bytes:
    """Request headers of a decrypt call, Hawk-signed without a payload hash (so the body can come later)."""
    if authorization is None:
        authorization = sign_request(credential, method="POST", resource=path, host="localhost", port=port)
    return (f"POST {path} HTTP/1.1\r\nHost: localhost:{port}\r\nContent-Type: application/json\r\n"
            f"Authorization: {authorization}\r\nContent-Length: {content_length}\r\n\r\n").encode()


def metric_value(text: str, name: str, **labels: str) -> float:
    """One sample of the Prometheus text exposition; 0 when absent."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total
