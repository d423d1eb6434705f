"""What every route shares: request ids, errors -> responses, request finishing and the access log, body reading.

The native and ops listeners run this as aiohttp middleware (`context_middleware`); the platform listener,
which has no middleware chain, calls `request_finished` itself. Error bodies on these listeners are
`{"error": {"code", "message"}, "request_id"}`; the platform's own shape is in `lkm.web.platform`.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from lkm.auth import Actor
from lkm.errors import InvalidRequest, LkmError, PayloadTooLarge
from lkm.keys import KeyRecord, public_key_views
from lkm.logs import DirectLine, RecordTemplates, direct_writer
from lkm.metrics import OTHER_ROUTE
from lkm.service import KeyService, RequestContext
from lkm.web.protocol import body_read, client_of, lost_request_status, request_ended, request_started
from lkm.web.routes import ListenerName

log = logging.getLogger("lkm.web")
access_log = logging.getLogger("lkm.access")
_access_records = RecordTemplates(__file__)



class WebObserver:
    """What the web layer reports; the server plugs metrics in. The base class reports nothing."""

    def request_done(self, listener: str, route: str, method: str, status: int | str, seconds: float) -> None:
        pass

    def inflight(self, listener: str, delta: int) -> None:
        pass

    def auth_failure(self, method: str, reason: str) -> None:
        pass

    def connection_refused(self, listener: str, reason: str) -> None:
        pass

    def connection_timed_out(self, listener: str) -> None:
        pass

    def connections_open(self, listener: str, delta: int) -> None:
        pass


class RequestIds:
    """Request ids: a random prefix per server and a counter, 32 hex digits like a UUID's.

    Unique without a system call per request; on a loaded server every system call on the event loop is a
    chance for a worker thread to take the GIL, so the hot path avoids the ones it does not need.
    """

    def __init__(self) -> None:
        self._prefix = secrets.token_hex(8)
        self._next = itertools.count().__next__

    def new(self) -> str:
        return f"{self._prefix}{self._next() & 0xFFFF_FFFF_FFFF_FFFF:016x}"


@dataclass(frozen=True)
class WebContext:
    service: KeyService
    observer: WebObserver
    max_body_bytes: int
    request_ids: RequestIds = field(default_factory=RequestIds)


SERVICE = web.AppKey("service", WebContext)
LISTENER = web.AppKey("listener", ListenerName)
REQUEST_ID = web.RequestKey("request_id", str)
ACTOR = web.RequestKey("actor", Actor)


# --- errors -> responses -----------------------------------------------------------------------------------

def render_error(request: web.Request, error: LkmError) -> web.Response:
    headers = {}
    if error.retry_after is not None:
        headers["Retry-After"] = str(error.retry_after)
    body = {"error": {"code": error.code, "message": error.message}, "request_id": request.get(REQUEST_ID)}
    return web.json_response(body, status=error.status, headers=headers)


def error_shape(request_ids: RequestIds) -> Callable[[int, str, str], web.Response]:
    """This shape for a request that never reached a handler (malformed HTTP): a fresh request id, no input."""

    def render(status: int, code: str, message: str) -> web.Response:
        body = {"error": {"code": code, "message": message}, "request_id": request_ids.new()}
        return web.json_response(body, status=status)

    return render


def _http_exception(request: web.Request, exc: web.HTTPException) -> web.Response:
    codes = {404: "not_found", 405: "method_not_allowed"}
    error = LkmError(exc.reason, code=codes.get(exc.status, "http_error"))
    error.status = exc.status
    response = render_error(request, error)
    if exc.status == 405 and "Allow" in exc.headers:
        response.headers["Allow"] = exc.headers["Allow"]
    return response


# --- request finishing and the access log ------------------------------------------------------------------

def _route_name(request: web.Request) -> str:
    info = request.match_info.route.resource
    return info.canonical if info is not None else OTHER_ROUTE


@web.middleware
async def context_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id, one access-log line, metrics, and error rendering for every request."""
    ctx = request.app[SERVICE]
    request_id = ctx.request_ids.new()
    request[REQUEST_ID] = request_id
    listener = request.app[LISTENER]
    started = time.perf_counter()
    ctx.observer.inflight(listener, 1)
    request_started(request)
    status: int | str = 500
    try:
        lost = None
        try:
            response = await handler(request)
        except LkmError as exc:
            response = render_error(request, exc)
        except web.HTTPRequestEntityTooLarge:
            response = render_error(request, PayloadTooLarge())
        except web.HTTPException as exc:
            response = _http_exception(request, exc)
        except ConnectionError:
            lost = lost_request_status(request)
            response = lost_connection(request_id, lost)
        except Exception:
            log.exception("unhandled error", extra={"request_id": request_id})
            response = render_error(request, LkmError())
        status = lost or response.status
        response.headers["X-Request-Id"] = request_id
        return response
    finally:
        request_finished(ctx.observer, listener, request, request_id=request_id, route=_route_name(request),
                         status=status, started=started)


def lost_connection(request_id: str, how: str) -> web.Response:
    """A request whose client went away (or missed the deadline): logged at debug, answered to no one."""
    log.debug("connection closed before the request was answered", extra={"request_id": request_id, "end": how})
    response = web.Response(status=400)
    response.force_close()
    return response


def request_finished(observer: WebObserver, listener: str, request: web.BaseRequest, *, request_id: str,
                     route: str, status: int | str, started: float) -> None:
    """Every listener's end of a request: in-flight gauge, request metrics, one access-log line."""
    request_ended(request)
    finish_request(observer, listener, request_id=request_id, route=route, status=status, started=started,
                   method=request.method, raw_path=request.raw_path, client=lambda: client_of(request),
                   actor=request.get(ACTOR))


def finish_request(observer: WebObserver, listener: str, *, request_id: str, route: str, status: int | str,
                   started: float, method: str, raw_path: str, client: Callable[[], str | None],
                   actor: Actor | None) -> None:
    """The end of a request however it was served: in-flight gauge, request metrics, one access-log line."""
    elapsed = time.perf_counter() - started
    observer.inflight(listener, -1)
    observer.request_done(listener, route, method, status, elapsed)
    if access_log.isEnabledFor(logging.INFO):
        fields = {"request_id": request_id, "listener": listener, "method": method, "route": route,
                  "path": cut_path(raw_path), "status": status, "latency_ms": round(elapsed * 1000, 3),
                  "client": client(), "actor": getattr(actor, "name", None)}
        writer = direct_writer(access_log, logging.INFO)
        if writer is not None:  # the server's own set-up: the line, without a record to make and dispatch
            writer.emit_direct(DirectLine(access_log.name, logging.INFO, "request", fields))
        else:  # a record + handle is what info() does, minus the stack walk that finds the caller's line
            access_log.handle(_access_records.record(access_log, logging.INFO, "request", fields))


MAX_LOGGED_PATH = 256


def cut_path(raw_path: str) -> str:
    """A raw request target without its query, cut short for the access log: percent-encoding stays intact (a
    decoded %0a would start a forged log line)."""
    raw = raw_path.split("?", 1)[0]
    return raw if len(raw) <= MAX_LOGGED_PATH else raw[:MAX_LOGGED_PATH] + "..."


def application(wctx: WebContext, listener: ListenerName, *middlewares: Middleware,
                client_max_size: int = 1024**2) -> web.Application:
    """An application for one listener, `context_middleware` first so every request is finished alike."""
    app = web.Application(middlewares=[context_middleware, *middlewares], client_max_size=client_max_size)
    app[SERVICE] = wctx
    app[LISTENER] = listener
    return app


# --- request bodies ----------------------------------------------------------------------------------------

async def read_body(request: web.BaseRequest, limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"request body larger than {limit} bytes")
    # A body may arrive in several TLS records; read until its end, never trusting one read to hold it all.
    chunks: list[bytes] = []
    size = 0
    while chunk := await request.content.read(limit + 1 - size):
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body larger than {limit} bytes")
    body_read(request)
    return b"".join(chunks)


def parse_json_object(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
        raise InvalidRequest("request body must be valid JSON", code="invalid_json") from None
    if not isinstance(data, dict):
        raise InvalidRequest("request body must be a JSON object", code="invalid_json")
    return data


def decode_b64(value: object, field: str) -> bytes:
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"{field} must be a non-empty base64 string", code="invalid_base64")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{field} is not valid base64", code="invalid_base64") from None


# --- what handlers hand to the service ---------------------------------------------------------------------

def native_context(request: web.Request, actor: Actor) -> RequestContext:
    """The service's view of a native-listener request made by `actor`."""
    return RequestContext(request_id=request[REQUEST_ID], actor=actor, client=client_of(request),
                          route=ListenerName.NATIVE)


def actor_context(request: web.Request) -> RequestContext:
    """The service's view of a request whose caller the identity middleware already established."""
    return native_context(request, request[ACTOR])


def key_json(record: KeyRecord, *, with_public: bool) -> dict[str, Any]:
    data = record.to_json()
    if with_public and record.public_key_der:
        data.update(public_key_views(record))
    return data
