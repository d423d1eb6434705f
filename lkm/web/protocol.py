"""Each connection's HTTP protocol: the request deadline, malformed requests, and the site that serves it.

    LkmRequestHandler  aiohttp's request handler plus a deadline for the whole request (headers and body) and
                       malformed requests answered in the listener's error shape, without echoing the input
    ListenerPolicy     what one listener's connections share: its guard, deadline, error shape and observer
    GuardedSite        a site listening on a `GuardedSocket` and serving `LkmRequestHandler`s
    request_started, body_read, request_ended, client_of   what the handlers tell and ask the connection

The deadline runs from the first byte of a request (or the end of the TLS handshake, which has the same
deadline) until its body has been read; a connection that has not delivered its request by then is closed. It
stops while the server works on a request, and starts again with the next one.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from lkm.web.connections import ConnectionGuard, GuardedSocket, LogThrottle

log = logging.getLogger("lkm.web")

# What a malformed request is told, by the status aiohttp's parser chose; never any of the request's bytes.
_MALFORMED: dict[int, tuple[str, str]] = {
    400: ("malformed_request", "malformed HTTP request"),
    413: ("payload_too_large", "request too large"),
    431: ("header_too_large", "request header fields too large"),
}
INTERNAL = ("internal_error", "internal error")

ErrorShape = Callable[[int, str, str], web.Response]  # (status, code, message) -> the listener's error response


class RequestEnd(enum.StrEnum):
    """How a request ended when no response could be sent: the `status` of its metrics and access-log line."""

    CLIENT_CLOSED = "client_closed"  # the client went away
    TIMED_OUT = "timeout"  # the request did not arrive in full within the listener's request_timeout


class Phase(enum.Enum):
    """Where a connection stands, for its timers (both platform protocols and the aiohttp listeners)."""

    IDLE = 0  # between requests: the keep-alive timeout applies
    RECEIVING = 1  # a request is arriving: the listener's deadline runs
    BUSY = 2  # the request is in: the server works on it


@dataclass
class ListenerPolicy:
    listener: str
    guard: ConnectionGuard
    request_timeout: float
    error_shape: ErrorShape
    on_timeout: Callable[[str], None]
    on_malformed: Callable[[str, int], None]
    malformed_log: LogThrottle = field(default_factory=LogThrottle)


class LkmRequestHandler(RequestHandler):
    __slots__ = ("_pending", "_phase", "_policy", "_timer", "timed_out")

    def __init__(self, manager: web.Server, *, policy: ListenerPolicy, loop: asyncio.AbstractEventLoop,
                 **options: Any) -> None:
        super().__init__(manager, loop=loop, **options)
        self._policy = policy
        self._timer: asyncio.TimerHandle | None = None
        self._phase = Phase.IDLE
        self._pending = False
        self.timed_out = False

    # --- the deadline ----------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._receiving()

    def data_received(self, data: bytes) -> None:
        if self._phase is Phase.IDLE and data:
            self._receiving()
        elif self._phase is Phase.BUSY and data:
            self._pending = True  # a pipelined request: its deadline starts when this one is answered
        super().data_received(data)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._stop_timer()
        super().connection_lost(exc)

    def _receiving(self) -> None:
        self._phase = Phase.RECEIVING
        self._pending = False
        self._stop_timer()
        self._timer = self._loop.call_later(self._policy.request_timeout, self._expired)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        if self._phase is Phase.RECEIVING:
            self.timed_out = True
            self._policy.on_timeout(self._policy.listener)
            self.force_close()

    def request_started(self, has_body: bool) -> None:
        if not has_body:
            self._busy()

    def _busy(self) -> None:
        self._phase = Phase.BUSY
        self._stop_timer()

    def request_ended(self) -> None:
        if self._pending:
            self._receiving()
        else:
            self._phase = Phase.IDLE
            self._stop_timer()

    # --- malformed requests ----------------------------------------------------------------------------------

    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """aiohttp's answer to a request it could not parse (or a handler's escaped exception), in our shape."""
        if request.writer.output_size > 0:
            raise ConnectionError("response already started, cannot send another")
        policy = self._policy
        if status >= 500:
            log.error("unhandled error", exc_info=exc, extra={"listener": policy.listener})
            code, text = INTERNAL
            policy.on_malformed(policy.listener, status)
        else:
            code, text = malformed(policy, request.remote, status, type(exc).__name__ if exc is not None else None)
        if exc is not None and status < 500:
            # Its traceback holds the parser's frame, and with it this connection and its buffers, in a cycle
            # only the collector's oldest generation would free: a flood of bad requests would pile them up.
            exc.__traceback__ = None
        response = policy.error_shape(status, code, text)
        response.force_close()
        response.headers["Connection"] = "close"
        return response


def malformed(policy: ListenerPolicy, client: str | None, status: int, error: str | None) -> tuple[str, str]:
    """A request that could not be parsed: counted, logged (one line a second at most, none of its bytes), and
    the code and message to answer it with."""
    code, text = _MALFORMED.get(status, _MALFORMED[400])
    held = policy.malformed_log.allow()
    if held is not None:
        log.info("malformed HTTP request", extra={
            "listener": policy.listener, "client": client, "status": status, "error": error, "held_back": held})
    policy.on_malformed(policy.listener, status)
    return code, text


def _connection(request: web.BaseRequest) -> LkmRequestHandler | None:
    protocol = request.protocol
    return protocol if isinstance(protocol, LkmRequestHandler) else None


def request_started(request: web.BaseRequest) -> None:
    """A handler has the request's headers; without a body to come, the deadline stops here."""
    connection = _connection(request)
    if connection is not None:
        connection.request_started(request.body_exists)


def body_read(request: web.BaseRequest) -> None:
    """The request's body is in: the deadline stops."""
    connection = _connection(request)
    if connection is not None:
        connection._busy()


def request_ended(request: web.BaseRequest) -> None:
    connection = _connection(request)
    if connection is not None:
        connection.request_ended()


def lost_request_status(request: web.BaseRequest) -> RequestEnd:
    """What to count for a request whose connection closed under it."""
    connection = _connection(request)
    return RequestEnd.TIMED_OUT if connection is not None and connection.timed_out else RequestEnd.CLIENT_CLOSED


def client_of(request: web.BaseRequest) -> str | None:
    """The client's address: the peer's, or behind a trusted proxy the one it forwarded."""
    connection = _connection(request)
    if connection is None:
        return request.remote
    guard = connection._policy.guard
    if not guard.trusted_proxies:
        return request.remote
    return guard.client_address(request.remote, request.headers.get("X-Forwarded-For"))


class GuardedSite(web.BaseSite):
    """A listening site whose socket refuses connections at accept and whose connections keep a deadline."""

    def __init__(self, runner: web.BaseRunner, sock: GuardedSocket, policy: ListenerPolicy, *,
                 ssl_context: ssl.SSLContext | None, **handler_options: Any) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=1024)
        self.sock = sock
        self.policy = policy
        self.handler_options = handler_options
        host, port = sock.getsockname()[:2]
        self.port: int = port
        self._name = f"{'https' if ssl_context else 'http'}://{host}:{port}"

    @property
    def name(self) -> str:
        return self._name

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        manager = self._runner.server
        assert manager is not None
        policy, options = self.policy, self.handler_options

        def factory() -> LkmRequestHandler:
            return LkmRequestHandler(manager, policy=policy, loop=loop, **options)

        self._server = await loop.create_server(
            factory, sock=self.sock, ssl=self._ssl_context, backlog=self._backlog,
            ssl_handshake_timeout=policy.request_timeout if self._ssl_context is not None else None)
