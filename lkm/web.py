"""aiohttp routes and middleware. Wire formats live here and in `web_platform`, `web_admin` and `web_batch`.

The platform's listener is `lkm.web_platform`; two applications here, one per other listener:
  native    lkm's JSON API behind mutual TLS (`{"error": {"code", "message"}, "request_id"}`)
  ops       health, readiness and metrics on a plain-HTTP operations listener
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from lkm.auth import Actor, ClientPolicy
from lkm.errors import (
    Forbidden,
    InvalidRequest,
    LkmError,
    PayloadTooLarge,
    Unauthenticated,
)
from lkm.keys import Algorithm, KeyRecord, b64, parse_key_id, public_key_views
from lkm.roles import Role
from lkm.service import KeyService, RequestContext

log = logging.getLogger("lkm.web")
access_log = logging.getLogger("lkm.access")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class WebObserver:
    """What the web layer reports; the server plugs metrics in. The base class reports nothing."""

    def request_done(self, listener: str, route: str, method: str, status: int, seconds: float) -> None:
        pass

    def inflight(self, listener: str, delta: int) -> None:
        pass

    def auth_failure(self, method: str, reason: str) -> None:
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
LISTENER = web.AppKey("listener", str)
REQUEST_ID = web.RequestKey("request_id", str)
ACTOR = web.RequestKey("actor", Actor)


# --- shared plumbing ---------------------------------------------------------------------------------------

def _route_name(request: web.Request) -> str:
    info = request.match_info.route.resource
    return info.canonical if info is not None else "other"


def render_error(request: web.Request, error: LkmError) -> web.Response:
    headers = {}
    if error.retry_after is not None:
        headers["Retry-After"] = str(error.retry_after)
    body = {"error": {"code": error.code, "message": error.message}, "request_id": request.get(REQUEST_ID)}
    return web.json_response(body, status=error.status, headers=headers)


@web.middleware
async def context_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id, one access-log line, metrics, and error rendering for every request."""
    ctx = request.app[SERVICE]
    request_id = ctx.request_ids.new()
    request[REQUEST_ID] = request_id
    listener = request.app[LISTENER]
    started = time.perf_counter()
    ctx.observer.inflight(listener, 1)
    status = 500
    try:
        try:
            response = await handler(request)
        except LkmError as exc:
            response = render_error(request, exc)
        except web.HTTPRequestEntityTooLarge:
            response = render_error(request, PayloadTooLarge())
        except web.HTTPException as exc:
            response = _http_exception(request, exc)
        except Exception:
            log.exception("unhandled error", extra={"request_id": request_id})
            response = render_error(request, LkmError())
        status = response.status
        response.headers["X-Request-Id"] = request_id
        return response
    finally:
        request_finished(ctx.observer, listener, request, request_id=request_id, route=_route_name(request),
                         status=status, started=started)


def request_finished(observer: WebObserver, listener: str, request: web.BaseRequest, *, request_id: str,
                     route: str, status: int, started: float) -> None:
    """Every listener's end of a request: in-flight gauge, request metrics, one access-log line."""
    elapsed = time.perf_counter() - started
    observer.inflight(listener, -1)
    observer.request_done(listener, route, request.method, status, elapsed)
    if access_log.isEnabledFor(logging.INFO):
        # makeRecord + handle is what info() does, minus the stack walk that finds the caller's line.
        access_log.handle(access_log.makeRecord(access_log.name, logging.INFO, __file__, 0, "request", (), None,
                                                extra={
            "request_id": request_id, "listener": listener, "method": request.method, "route": route,
            "path": logged_path(request), "status": status, "latency_ms": round(elapsed * 1000, 3),
            "client": request.remote, "actor": getattr(request.get(ACTOR), "name", None)}))


MAX_LOGGED_PATH = 256


def logged_path(request: web.BaseRequest) -> str:
    """The path as sent, percent-encoding intact (a decoded %0a would start a forged log line), cut short."""
    raw = request.raw_path.split("?", 1)[0]
    return raw if len(raw) <= MAX_LOGGED_PATH else raw[:MAX_LOGGED_PATH] + "..."


def _http_exception(request: web.Request, exc: web.HTTPException) -> web.Response:
    codes = {404: "not_found", 405: "method_not_allowed"}
    error = LkmError(exc.reason, code=codes.get(exc.status, "http_error"))
    error.status = exc.status
    response = render_error(request, error)
    if exc.status == 405 and "Allow" in exc.headers:
        response.headers["Allow"] = exc.headers["Allow"]
    return response


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


def _client_address(request: web.Request) -> str | None:
    return request.remote


# --- the native API ----------------------------------------------------------------------------------------

def native_identity_middleware(policy: ClientPolicy) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def identify(request: web.Request, handler: Handler) -> web.StreamResponse:
        ctx = request.app[SERVICE]
        ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if not der:
            ctx.observer.auth_failure("mtls", "no_certificate")
            raise Unauthenticated("a client certificate is required", code="no_client_certificate")
        actor = policy.identify(der)
        if actor is None:
            ctx.observer.auth_failure("mtls", "unknown_client")
            stranger = Actor(kind="mtls", name="unlisted")
            error = Forbidden("this client certificate is not on the allow list", code="unknown_client")
            await ctx.service.audit_denial(_context(request, stranger), "authenticate", error)
            raise error
        request[ACTOR] = actor
        try:
            return await handler(request)
        except Forbidden as exc:
            if exc.code == "forbidden_role":
                ctx.observer.auth_failure("mtls", "forbidden_role")
            await ctx.service.audit_denial(_context(request, actor), "authorize", exc,
                                           key_id=_valid_key_id(request.match_info.get("id")))
            raise

    return identify


def _valid_key_id(value: str | None) -> str | None:
    """A key id from the URL for the audit trail, only if it is one: raw URL text never goes there."""
    try:
        return parse_key_id(value) if value is not None else None
    except InvalidRequest:
        return None


def _context(request: web.Request, actor: Actor) -> RequestContext:
    return RequestContext(request_id=request[REQUEST_ID], actor=actor, client=_client_address(request),
                          route="native")


def actor_context(request: web.Request) -> RequestContext:
    return _context(request, request[ACTOR])


def key_json(record: KeyRecord, *, with_public: bool) -> dict[str, Any]:
    data = record.to_json()
    if with_public and record.public_key_der:
        data.update(public_key_views(record))
    return data


async def list_keys(request: web.Request) -> web.StreamResponse:
    ctx = request.app[SERVICE]
    records = await ctx.service.list_keys(actor_context(request))
    return web.json_response({"keys": [key_json(r, with_public=False) for r in records]})


async def get_key(request: web.Request) -> web.StreamResponse:
    ctx = request.app[SERVICE]
    record = await ctx.service.get_key(actor_context(request), parse_key_id(request.match_info["id"]))
    return web.json_response(key_json(record, with_public=True))


async def unwrap(request: web.Request) -> web.StreamResponse:
    ctx = request.app[SERVICE]
    rctx = actor_context(request)
    rctx.actor.require(Role.UNWRAP)
    key_id = parse_key_id(request.match_info["id"])
    data = parse_json_object(await read_body(request, ctx.max_body_bytes))
    ciphertext = decode_b64(data.get("wrapped_key"), "wrapped_key")
    algorithm = Algorithm.parse(data.get("algorithm", Algorithm.RSA_OAEP_SHA1.value))
    plaintext = await ctx.service.unwrap(rctx, key_id, ciphertext, algorithm)
    return web.json_response({"id": key_id, "key": b64(plaintext)})


def native_app(wctx: WebContext, policy: ClientPolicy) -> web.Application:
    app = web.Application(middlewares=[context_middleware, native_identity_middleware(policy)],
                          client_max_size=wctx.max_body_bytes)
    app[SERVICE] = wctx
    app[LISTENER] = "native"
    app.router.add_get("/v1/keys", list_keys)
    app.router.add_get("/v1/keys/{id}", get_key)
    app.router.add_post("/v1/keys/{id}/unwrap", unwrap)
    return app


# --- operations --------------------------------------------------------------------------------------------

class ReadinessView:
    """What /readyz shows; the server keeps it current."""

    def __init__(self) -> None:
        self.checks: dict[str, tuple[bool, str]] = {}

    @property
    def ready(self) -> bool:
        return bool(self.checks) and all(ok for ok, _ in self.checks.values())

    def to_json(self) -> dict[str, Any]:
        return {"ready": self.ready,
                "checks": {name: {"ok": ok, "detail": detail} for name, (ok, detail) in self.checks.items()}}


READINESS = web.AppKey("readiness", ReadinessView)
MetricsRender = Callable[[], tuple[bytes, str]]
METRICS_RENDER: web.AppKey[MetricsRender] = web.AppKey("metrics_render")


async def healthz(_: web.Request) -> web.StreamResponse:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.StreamResponse:
    view = request.app[READINESS]
    return web.json_response(view.to_json(), status=200 if view.ready else 503)


async def metrics(request: web.Request) -> web.StreamResponse:
    body, content_type = request.app[METRICS_RENDER]()
    response = web.Response(body=body)
    response.headers["Content-Type"] = content_type
    return response


def ops_app(wctx: WebContext, readiness: ReadinessView,
            render_metrics: Callable[[], tuple[bytes, str]] | None) -> web.Application:
    app = web.Application(middlewares=[context_middleware])
    app[SERVICE] = wctx
    app[LISTENER] = "ops"
    app[READINESS] = readiness
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    if render_metrics is not None:
        app[METRICS_RENDER] = render_metrics
        app.router.add_get("/metrics", metrics)
    return app
