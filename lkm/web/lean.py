"""The platform listener's own HTTP/1.1: one `asyncio.Protocol` per connection, no HTTP framework.

The platform sends one kind of request: a small POST with Content-Length, kept alive, one at a time. Serving it
through aiohttp's request, stream and response objects cost about a third of the event loop's time outside the
RSA operation; this protocol parses with bytes operations (the head found once, split once, header names
lowercased once), answers with pre-built status lines, and hands the request to the same pieces the aiohttp
handler uses (`PlatformHandler`: Hawk, the unwrap, the refusal audit; the request finisher; the connection
guard; the listener's deadline and malformed-request accounting). It refuses what the platform never sends:
transfer codings other than chunked, a second request while one is in flight (it waits in a bounded buffer).

    LeanSite       the listener: a guarded socket served by `LeanConnection`s, drained on stop
    LeanConnection one connection: deadline while a request arrives, keep-alive timeout between requests
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
import urllib.parse

from lkm.auth import Actor
from lkm.errors import HawkError, InvalidRequest, LkmError, MalformedHttp, PayloadTooLarge
from lkm.keys import b64
from lkm.web.connections import GuardedSocket
from lkm.web.platform import (
    HEALTH_PATH,
    LISTENER,
    OPTIONS_BODY,
    PlatformHandler,
    platform_context,
    platform_error_parts,
)
from lkm.web.plumbing import finish_request
from lkm.web.protocol import INTERNAL, ListenerPolicy, Phase, RequestEnd, malformed
from lkm.web.wire import (
    CHUNKED,
    JSON,
    MAX_HEAD,
    WireRequest,
    dechunk,
    error_body,
    parse_head,
    response_bytes,
)

log = logging.getLogger("lkm.web")

READ_BUFFER = 256 * 1024  # what asyncio reads at most at once; more waits for the next read
DRAIN_SECONDS = 60.0  # in-flight requests get this long to finish when the listener stops
_OPTIONS_BODY_JSON = json.dumps(OPTIONS_BODY).encode()


class LeanConnection(asyncio.BufferedProtocol):
    """One platform connection; one request at a time, the next one buffered (bounded) until it is answered.

    A buffered protocol: the TLS layer decrypts straight into the listener's read buffer, where asyncio's
    `data_received` path allocates a 256 KiB bytes object for every read attempt (two per TLS record, the
    second to learn there is no more) and shrinks it to what arrived."""

    def __init__(self, site: LeanSite) -> None:
        self.site = site
        self.policy = site.policy
        self.loop = site.loop
        self.transport: asyncio.Transport | None = None
        self.peer: str | None = None
        self.buffer = bytearray()
        self.phase = Phase.IDLE
        self.timer: asyncio.TimerHandle | None = None
        self.expires = 0.0  # loop time at which the current phase (receiving or idle) ends the connection
        self.timed_out = False
        self.closed = False
        self.request: WireRequest | None = None
        self.body_waiter: asyncio.Future[bytes] | None = None
        self.paused = False

    # --- the connection ---------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if peer else None
        self.site.connections.add(self)
        self._receiving()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        self._stop_timer()
        self.site.connections.discard(self)
        waiter = self.body_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionResetError("the connection closed before the body arrived"))

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.site.read_buffer  # filled and handed to buffer_updated in the same call, on the loop thread

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self.site.read_buffer[:nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
        if self.phase is Phase.IDLE:
            self._receiving()
        self.buffer += data
        waiter = self.body_waiter
        if waiter is not None:
            if not waiter.done():
                try:
                    body = self._ready_body()
                except (MalformedHttp, PayloadTooLarge) as exc:
                    waiter.set_exception(exc)
                else:
                    if body is not None:
                        waiter.set_result(body)
        elif self.request is None:
            self._next()
        if len(self.buffer) > MAX_HEAD + self.site.max_body and not self.paused and self.transport is not None:
            self.paused = True  # a client that sends ahead of its answers waits for them
            self.transport.pause_reading()

    def _ready_body(self) -> bytes | None:
        """The current request's body taken from the buffer once it is all there (the deadline stops)."""
        request = self.request
        assert request is not None
        if request.length == CHUNKED:
            done = dechunk(self.buffer, self.site.max_body)
            if done is None:
                return None
            body, used = done
        elif len(self.buffer) >= request.length:
            body, used = bytes(self.buffer[:request.length]), int(request.length)
        else:
            return None
        del self.buffer[:used]
        self._busy()
        return body

    def _next(self) -> None:
        """The next request in the buffer, if its head is complete."""
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > MAX_HEAD:
                self._refuse_malformed(MalformedHttp(431, "LineTooLong"))
            return
        head = bytes(self.buffer[:end])
        del self.buffer[:end + 4]
        try:
            request = parse_head(head)
        except MalformedHttp as exc:
            self._refuse_malformed(exc)
            return
        self.request = request
        if request.length == 0:
            self._busy()
        self.site.started(self, request)

    def _refuse_malformed(self, exc: MalformedHttp) -> None:
        _, text = malformed(self.policy, self.peer, exc.status, str(exc))
        if exc.status == 411:
            text = "only chunked or Content-Length bodies are accepted"
        self._busy()
        self.buffer.clear()
        self.write(response_bytes(exc.status, JSON, error_body(exc.status, text), None, close=True), close=True)

    async def body(self, limit: int) -> bytes:
        """The current request's body; waits for it within the deadline."""
        request = self.request
        assert request is not None
        if request.length > limit:
            raise PayloadTooLarge(f"request body larger than {limit} bytes")
        try:
            body = self._ready_body()
            if body is not None:
                return body
            if self.closed:
                raise ConnectionResetError("the connection is closed")
            self.body_waiter = self.loop.create_future()
            try:
                return await self.body_waiter
            finally:
                self.body_waiter = None
        except MalformedHttp:
            raise InvalidRequest("malformed chunked request body", code="malformed_request") from None

    def body_unread(self) -> bool:
        """Whether the current request's body is still (partly) unread: then the connection cannot go on."""
        request = self.request
        return request is not None and request.length != 0 and self.phase is not Phase.BUSY

    def finish(self, answer: bytes, *, close: bool) -> None:
        """The answer written; the connection goes on with the next request, waits for one, or closes."""
        if self.body_unread():  # a body the answer did not need: skipped when it is all here, else the end
            try:
                close = close or self._ready_body() is None
            except (MalformedHttp, PayloadTooLarge):
                close = True
        self.request = None
        close = close or self.site.stopping
        if close and answer:
            end = answer.find(b"\r\n\r\n") + 2
            answer = answer[:end] + b"Connection: close\r\n" + answer[end:]
        self.write(answer, close=close)
        if self.closed or self.transport is None or self.transport.is_closing():
            return
        if self.paused:
            self.paused = False
            self.transport.resume_reading()
        if self.buffer:
            self._receiving()
            self._next()
        else:
            self._idle()

    def write(self, data: bytes, *, close: bool) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.write(data)
        if close:
            self._stop_timer()
            transport.close()

    # --- the deadline and the keep-alive timeout --------------------------------------------------------------
    # One timer per connection, not one per request: a phase change only moves `expires`; the timer, when it
    # fires early, re-arms itself for the current expiry. It is rescheduled only when the new expiry comes
    # sooner than the timer's (an idle connection's first request), so each request costs two clock reads
    # instead of two timer handles created, heap-pushed and cancelled.

    def _receiving(self) -> None:
        self.phase = Phase.RECEIVING
        self._arm(self.policy.request_timeout)

    def _busy(self) -> None:
        self.phase = Phase.BUSY

    def _idle(self) -> None:
        self.phase = Phase.IDLE
        self._arm(self.site.keep_alive)

    def _arm(self, delay: float) -> None:
        expires = self.expires = self.loop.time() + delay
        timer = self.timer
        if timer is not None:
            if timer.when() <= expires:
                return
            timer.cancel()
        self.timer = self.loop.call_at(expires, self._fired)

    def _stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _fired(self) -> None:
        self.timer = None
        phase = self.phase
        if phase is Phase.BUSY or self.transport is None:
            return  # no deadline while the server works; the next phase arms the timer again
        if self.loop.time() < self.expires:
            self.timer = self.loop.call_at(self.expires, self._fired)
        elif phase is Phase.RECEIVING:
            self.timed_out = True
            self.policy.on_timeout(self.policy.listener)
            self.transport.abort()
        else:
            self.transport.close()

    def client(self) -> str | None:
        """The client's address: the peer's, or behind a trusted proxy the one it forwarded."""
        guard = self.policy.guard
        request = self.request
        if not guard.trusted_proxies or request is None:
            return self.peer
        return guard.client_address(self.peer, request.headers.get("x-forwarded-for"))


class LeanSite:
    """The platform listener served by `LeanConnection`s on a guarded socket."""

    def __init__(self, handler: PlatformHandler, sock: GuardedSocket, policy: ListenerPolicy, *,
                 ssl_context: ssl.SSLContext | None, keep_alive: float) -> None:
        self.handler = handler
        self.sock = sock
        self.policy = policy
        self.ssl_context = ssl_context
        self.keep_alive = keep_alive
        self.max_body = handler.wctx.max_body_bytes
        self.loop = asyncio.get_event_loop()
        self.port: int = sock.getsockname()[1]
        self.connections: set[LeanConnection] = set()
        self.read_buffer = memoryview(bytearray(READ_BUFFER))  # every connection's reads land here in turn
        self.inflight: set[asyncio.Task[None]] = set()
        self.stopping = False
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.server = await self.loop.create_server(
            lambda: LeanConnection(self), sock=self.sock, ssl=self.ssl_context, backlog=1024,
            ssl_handshake_timeout=self.policy.request_timeout if self.ssl_context is not None else None)

    async def cleanup(self) -> None:
        """Stop accepting, let the requests in flight finish (up to DRAIN_SECONDS), close every connection."""
        self.stopping = True
        if self.server is not None:
            self.server.close()
        for connection in list(self.connections):
            if connection.request is None and connection.transport is not None:
                connection.transport.close()
        pending = [task for task in self.inflight if not task.done()]  # one cancelled before it ran never left
        if pending:
            await asyncio.wait(pending, timeout=DRAIN_SECONDS)
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.abort()
        if self.server is not None:
            await self.server.wait_closed()

    def started(self, connection: LeanConnection, request: WireRequest) -> None:
        task = self.loop.create_task(self.serve(connection, request))
        self.inflight.add(task)  # serve() takes it out as it ends: no done-callback round trip per request

    async def serve(self, connection: LeanConnection, request: WireRequest) -> None:
        """One request from its head to its answer: finished (metrics, access log) whatever happens."""
        handler = self.handler
        wctx = handler.wctx
        request_id = wctx.request_ids.new()
        started = time.perf_counter()
        wctx.observer.inflight(LISTENER, 1)
        path = request.path
        route = handler.route_of(path)
        status: int | str = 500
        actor: list[Actor] = []
        close = request.close
        client = connection.client()  # once: for the audit record and the access log alike
        try:
            try:
                status, answer, force_close = await self.dispatch(connection, request, request_id, route,
                                                                  client=client, actor=actor)
                close = close or force_close
            except LkmError as exc:
                status, extra = platform_error_parts(exc)
                answer = response_bytes(status, JSON, error_body(status, exc.message), request_id, extra)
                close = close or connection.body_unread()
            except ConnectionError:
                status = RequestEnd.TIMED_OUT if connection.timed_out else RequestEnd.CLIENT_CLOSED
                log.debug("connection closed before the request was answered",
                          extra={"request_id": request_id, "end": status})
                answer, close = b"", True
            except Exception:
                log.exception("unhandled error", extra={"request_id": request_id})
                status = 500
                answer = response_bytes(500, JSON, error_body(500, INTERNAL[1]), request_id)
            connection.finish(answer, close=close)
        finally:
            self.inflight.discard(asyncio.current_task(self.loop))  # given its loop: no getpid() system call
            finish_request(wctx.observer, LISTENER, request_id=request_id, route=route, status=status,
                           started=started, method=request.method, raw_path=request.target,
                           client=lambda: client, actor=actor[0] if actor else None)

    async def dispatch(self, connection: LeanConnection, request: WireRequest, request_id: str, route: str, *,
                       client: str | None, actor: list[Actor]) -> tuple[int, bytes, bool]:
        """(status, the whole answer, whether to close) for one request."""
        method = request.method
        if route == HEALTH_PATH:
            if method in ("GET", "HEAD"):
                return 200, response_bytes(200, b"text/plain; charset=utf-8", b"OK", request_id,
                                           head_only=method == "HEAD"), False
            return self.plain(405, "Method Not Allowed", request_id, {"Allow": "GET, HEAD"})
        if route != self.handler.path:
            return self.plain(404, "Not Found", request_id)
        if method not in ("POST", "OPTIONS"):
            return self.plain(405, "Method Not Allowed", request_id, {"Allow": "POST, OPTIONS"})
        handler = self.handler
        headers = request.headers
        path, query = request.raw_path, request.query
        try:
            verified = await handler.authenticate(method, path, query, headers.get("host"),
                                                  headers.get("authorization"))
            body = await connection.body(self.max_body)
            handler.verifier.verify_payload(verified.claimed_hash, headers.get("content-type"), body)
        except HawkError as exc:
            error, extra = await handler.refusal(exc, headers.get("authorization"),
                                                 lambda who: platform_context(request_id, who, client,
                                                                              headers.get("purecloud-user-id")))
            status, extra = platform_error_parts(error, extra)
            return status, response_bytes(status, JSON, error_body(status, error.message), request_id, extra), \
                False
        who = handler.actor_of(verified)
        actor.append(who)
        if method == "OPTIONS":
            return 200, response_bytes(200, JSON, _OPTIONS_BODY_JSON, request_id, {"Allow": "POST, OPTIONS"}), False
        query_type = urllib.parse.parse_qs(query, keep_blank_values=True).get("decryptType", [None])[0] \
            if query else None
        plaintext = await handler.unwrap(body, query_type, platform_context(
            request_id, who, client, headers.get("purecloud-user-id")))
        return 200, response_bytes(200, JSON, b'{"body": "' + b64(plaintext).encode("ascii") + b'"}',
                                   request_id), False

    @staticmethod
    def plain(status: int, message: str, request_id: str,
              extra: dict[str, str] | None = None) -> tuple[int, bytes, bool]:
        return status, response_bytes(status, JSON, error_body(status, message), request_id, extra), False
