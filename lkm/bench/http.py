"""Just enough HTTP/1.1 over TLS to drive lkm, spending as little CPU in the client as possible.

The load generator shares the machine's cores with the server it measures, so every microsecond it spends per
request is taken from the server. A general client (aiohttp) costs several times more per request than this:
one asyncio protocol per connection, requests written as prepared bytes, answers parsed only as far as the
status line and Content-Length (lkm always sends one). Not for general use: no chunked bodies, no redirects,
no pipelining.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from dataclasses import dataclass
from typing import Any

from lkm.errors import ProtocolError

_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)
_CONNECTION_CLOSE = re.compile(rb"\r\nconnection:[ \t]*close", re.IGNORECASE)


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    keep_alive: bool


class ResumingContext(ssl.SSLContext):
    """A client context that offers the last TLS session it saw, so a new connection can resume it.

    asyncio creates its TLS objects with `wrap_bio` and offers no way to pass a session; this supplies one.
    `session` is updated by the caller (see `Connection.remember_session`).
    """

    session: ssl.SSLSession | None = None

    def wrap_bio(self, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO, server_side: bool = False,
                 server_hostname: str | bytes | None = None, session: ssl.SSLSession | None = None) -> ssl.SSLObject:
        offer = session if session is not None else (None if server_side else self.session)
        return super().wrap_bio(incoming, outgoing, server_side=server_side, server_hostname=server_hostname,
                                session=offer)


class _Protocol(asyncio.Protocol):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[Response] | None = None
        self.closed = False
        self.lost: asyncio.Future[None] = loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.waiter is not None:
            self._parse()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.lost.done():
            self.lost.set_result(None)
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(ProtocolError(f"connection closed before the answer was complete ({exc})"))

    def _parse(self) -> None:
        buffer = self.buffer
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(buffer[:end])
        match = _CONTENT_LENGTH.search(head)
        waiter = self.waiter
        assert waiter is not None
        if match is None or not head.startswith(b"HTTP/1.1 "):
            self.waiter = None
            waiter.set_exception(ProtocolError(f"unexpected answer: {head[:80]!r}"))
            return
        total = end + 4 + int(match.group(1))
        if len(buffer) < total:
            return
        body = bytes(buffer[end + 4:total])
        del buffer[:total]
        self.waiter = None
        waiter.set_result(Response(int(head[9:12]), body, _CONNECTION_CLOSE.search(head) is None))


class Connection:
    """One TLS (or plain TCP) connection that carries one request at a time."""

    def __init__(self, protocol: _Protocol, loop: asyncio.AbstractEventLoop) -> None:
        self._protocol = protocol
        self._loop = loop
        self.started_at = 0.0  # loop time the current request was sent, 0 when idle (for the watchdog)

    @classmethod
    async def open(cls, host: str, port: int, ssl_context: ssl.SSLContext | None) -> Connection:
        loop = asyncio.get_running_loop()
        kwargs: dict[str, Any] = {}
        if ssl_context is not None:
            kwargs = {"ssl": ssl_context, "server_hostname": host}
        _, protocol = await loop.create_connection(lambda: _Protocol(loop), host, port, **kwargs)
        return cls(protocol, loop)

    @property
    def closed(self) -> bool:
        return self._protocol.closed

    @property
    def ssl_object(self) -> ssl.SSLObject | None:
        transport = self._protocol.transport
        return transport.get_extra_info("ssl_object") if transport is not None else None

    async def exchange(self, request: bytes) -> Response:
        protocol = self._protocol
        if protocol.closed or protocol.transport is None:
            raise ProtocolError("connection is closed")
        waiter: asyncio.Future[Response] = self._loop.create_future()
        protocol.waiter = waiter
        self.started_at = self._loop.time()
        protocol.transport.write(request)
        if protocol.buffer:
            protocol._parse()
        try:
            return await waiter
        finally:
            self.started_at = 0.0

    def abort(self, reason: str) -> None:
        """Fails the request in flight (a timeout) and drops the connection."""
        protocol = self._protocol
        waiter, protocol.waiter = protocol.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(TimeoutError(reason))
        if protocol.transport is not None:
            protocol.transport.abort()

    def remember_session(self, context: ResumingContext) -> None:
        ssl_object = self.ssl_object
        if ssl_object is not None and ssl_object.session is not None:
            context.session = ssl_object.session

    def close(self) -> None:
        """Starts closing (a TLS close_notify goes out); `wait_closed` waits for the end."""
        if self._protocol.transport is not None:
            self._protocol.transport.close()

    async def wait_closed(self, grace: float = 2.0) -> None:
        """Waits until the connection is gone, aborting it after `grace` seconds."""
        self.close()
        try:
            await asyncio.wait_for(asyncio.shield(self._protocol.lost), grace)
        except TimeoutError:
            if self._protocol.transport is not None:
                self._protocol.transport.abort()
