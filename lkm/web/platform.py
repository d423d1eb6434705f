"""The platform's listener: its contract's two routes (and the sample's health route), byte-exact to its sample.

This listener carries every playback, download and export the platform makes, so it runs on aiohttp's
low-level server with one dispatching handler instead of an `Application` with a router and middleware
chain: measured on a 2-vCPU machine, that machinery cost about 0.2 ms of event-loop time per request, a fifth
of the RSA-3072 operation the request exists for, and every microsecond the loop holds the GIL is one a worker
thread finishing its RSA operation may have to wait. The handler does what the other listeners' middleware
does (request id, metrics, one access-log line, error rendering), written out once for three routes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from lkm.audit.record import AuditAction
from lkm.auth import Actor, ActorKind, platform_actor
from lkm.config import PlatformSettings
from lkm.errors import HawkError, HawkReason, InvalidRequest, LkmError, Unauthenticated, UnsupportedAlgorithm
from lkm.hawk import HawkVerifier, Verified, parse_authorization
from lkm.keys import Algorithm, b64, parse_key_id
from lkm.metrics import OTHER_ROUTE
from lkm.service import RequestContext
from lkm.web.plumbing import (
    ACTOR,
    WebContext,
    decode_b64,
    lost_connection,
    parse_json_object,
    read_body,
    request_finished,
)
from lkm.web.protocol import client_of, lost_request_status, request_started
from lkm.web.routes import ListenerName, Route

log = logging.getLogger("lkm.web")

LISTENER = ListenerName.PLATFORM
HEALTH_PATH = Route.PLATFORM_HEALTH
OPTIONS_BODY = {"encryptBody": {"keypairId": None, "body": None, "decryptType": None},
                "decryptResponse": {"body": "Decrypted Response"}}


def platform_error_parts(error: LkmError, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str]]:
    """The status and extra headers of an error's answer. The platform treats 4xx as the caller's problem;
    unknown key is 400 by contract."""
    status = 400 if error.status in (404, 409) else error.status
    extra = dict(headers or {})
    if error.retry_after is not None:
        extra["Retry-After"] = str(error.retry_after)
    return status, extra


def render_platform_error(error: LkmError, headers: dict[str, str] | None = None) -> web.Response:
    """The sample's error shape."""
    status, extra = platform_error_parts(error, headers)
    return _plain_error(status, error.message, extra)


def platform_error_shape(status: int, code: str, message: str) -> web.Response:
    """The sample's shape for a request that never reached the handler (malformed HTTP); it has no code field."""
    return _plain_error(status, message)


def _plain_error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    """For requests that reached no route: the sample's shape with the HTTP status as it is."""
    return web.json_response({"message": message, "status": status}, status=status, headers=headers)


class PlatformHandler:
    """Dispatches every request on the platform listener; one instance serves the listener."""

    def __init__(self, wctx: WebContext, settings: PlatformSettings, verifier: HawkVerifier,
                 default_port: int, shared_nonces: Callable[[Verified], Awaitable[bool]] | None = None) -> None:
        """`shared_nonces`, when given, replaces the verifier's in-memory replay check: True when the nonce is
        new to every replica (platform.hawk.replay_check: cluster)."""
        self.wctx = wctx
        self.settings = settings
        self.verifier = verifier
        self.shared_nonces = shared_nonces
        self.default_port = default_port
        self.path = settings.path
        self._actors: dict[str, Actor] = {}  # by Hawk id: only ids that verified, so bounded by the credentials

    def route_of(self, path: str) -> str:
        """The route label of a request path: the decrypt path, the health path, or any other."""
        return self.path if path == self.path else HEALTH_PATH if path == HEALTH_PATH else OTHER_ROUTE

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        wctx = self.wctx
        observer = wctx.observer
        request_id = wctx.request_ids.new()
        started = time.perf_counter()
        observer.inflight(LISTENER, 1)
        method = request.method
        path = request.path
        route = self.route_of(path)
        request_started(request)
        status: int | str = 500
        try:
            lost = None
            try:
                response = await self._dispatch(request, request_id, route, method)
            except LkmError as exc:
                response = render_platform_error(exc)
            except ConnectionError:
                lost = lost_request_status(request)
                response = lost_connection(request_id, lost)
            except Exception:
                log.exception("unhandled error", extra={"request_id": request_id})
                response = render_platform_error(LkmError())
            status = lost or response.status
            response.headers["X-Request-Id"] = request_id
            return response
        finally:
            request_finished(observer, LISTENER, request, request_id=request_id, route=route, status=status,
                             started=started)

    async def _dispatch(self, request: web.BaseRequest, request_id: str, route: str,
                        method: str) -> web.StreamResponse:
        if route == self.path:
            if method == "POST":
                return await self.decrypt(request, request_id)
            if method == "OPTIONS":
                return await self.options(request, request_id)
            return _plain_error(405, "Method Not Allowed", {"Allow": "POST, OPTIONS"})
        if route == HEALTH_PATH:
            if method in ("GET", "HEAD"):
                return web.Response(text="OK")
            return _plain_error(405, "Method Not Allowed", {"Allow": "GET, HEAD"})
        return _plain_error(404, "Not Found")

    async def read_authenticated(self, request: web.BaseRequest, request_id: str) -> bytes | web.Response:
        """The request body once Hawk verified it (the caller goes into request[ACTOR]), or the finished 401.

        The header's MAC is checked before the body is read: a stranger never gets the server to wait for, or
        hold, a body. The payload hash, when the client sent one, is checked once the body is in.
        """
        headers = request.headers
        try:
            verified = await self.authenticate(request.method, request.rel_url.raw_path,
                                               request.rel_url.raw_query_string, headers.get("Host"),
                                               headers.get("Authorization"))
        except HawkError as exc:
            return await self.refuse(request, request_id, exc)
        body = await read_body(request, self.wctx.max_body_bytes)
        try:
            self.verifier.verify_payload(verified.claimed_hash, headers.get("Content-Type"), body)
        except HawkError as exc:
            return await self.refuse(request, request_id, exc)
        request[ACTOR] = self.actor_of(verified)
        return body

    async def authenticate(self, method: str, raw_path: str, raw_query: str, host: str | None,
                           authorization: str | None) -> Verified:
        """The header's MAC, then the replay check (this server's or the cluster's); raises HawkError."""
        verified = self.verifier.verify_header(
            method=method, path=raw_path, query=raw_query, host_header=host,
            public_host=self.settings.public_host, public_port=self.settings.public_port,
            default_port=self.default_port, authorization=authorization)
        fresh = self.verifier.check_replay(verified) if self.shared_nonces is None else \
            await self.shared_nonces(verified)
        if not fresh:
            raise HawkError(HawkReason.REPLAY)
        return verified

    def actor_of(self, verified: Verified) -> Actor:
        credential = verified.credential
        actor = self._actors.get(credential.id)
        if actor is None:
            actor = self._actors[credential.id] = platform_actor(credential.id)
        return actor

    async def refuse(self, request: web.BaseRequest, request_id: str, exc: HawkError) -> web.Response:
        """The finished 401 response, audited, for a caller Hawk did not verify."""
        headers = request.headers
        error, extra = await self.refusal(exc, headers.get("Authorization"),
                                          lambda actor: _context(request, request_id, actor))
        response = render_platform_error(error, extra)
        if not request.content.is_eof():
            response.force_close()  # the body stays unread: the connection cannot carry another request
        return response

    async def refusal(self, exc: HawkError, authorization: str | None,
                      context: Callable[[Actor], RequestContext]) -> tuple[Unauthenticated, dict[str, str]]:
        """The audited 401 for a caller Hawk did not verify, with its WWW-Authenticate header."""
        self.wctx.observer.auth_failure(ActorKind.HAWK, exc.reason)
        error = Unauthenticated(str(exc), code=f"hawk_{exc.reason}")
        stranger = Actor(kind=ActorKind.HAWK, name="hawk:unverified", hawk_id=_claimed_hawk_id(authorization))
        await self.wctx.service.audit_denial(context(stranger), AuditAction.AUTHENTICATE, error)
        return error, {"WWW-Authenticate": exc.www_authenticate or "Hawk"}

    async def options(self, request: web.BaseRequest, request_id: str) -> web.StreamResponse:
        body = await self.read_authenticated(request, request_id)
        if isinstance(body, web.Response):
            return body
        return web.json_response(OPTIONS_BODY, headers={"Allow": "POST, OPTIONS"})

    async def decrypt(self, request: web.BaseRequest, request_id: str) -> web.StreamResponse:
        body = await self.read_authenticated(request, request_id)
        if isinstance(body, web.Response):
            return body
        plaintext = await self.unwrap(body, request.query.get("decryptType"),
                                      _context(request, request_id, request[ACTOR]))
        return web.json_response({"body": b64(plaintext)})

    async def unwrap(self, body: bytes, query_type: str | None, rctx: RequestContext) -> bytes:
        """The decrypt call's body checked and unwrapped; raises LkmError for the caller's mistakes."""
        data = parse_json_object(body)
        key_id = data.get("keypairId")
        if key_id is None:
            raise InvalidRequest("keypairId is required", code="missing_field")
        key_id = parse_key_id(key_id)
        if data.get("body") is None:
            raise InvalidRequest("body is required", code="missing_field")
        ciphertext = decode_b64(data.get("body"), "body")
        algorithm = self.algorithm(query_type, data.get("decryptType"))
        return await self.wctx.service.unwrap(rctx, key_id, ciphertext, algorithm)

    def algorithm(self, from_query: str | None, from_body: object) -> Algorithm:
        # The query parameter wins; older platform versions sent decryptType in the body.
        value = from_query if from_query is not None else from_body
        if value is None or value == "":
            return Algorithm.RSA_OAEP_SHA1
        if not isinstance(value, str) or value.lower() != "pkcs1":
            raise InvalidRequest("decryptType must be absent (RSA-OAEP) or pkcs1", code="invalid_decrypt_type")
        if not self.settings.allow_pkcs1:
            raise UnsupportedAlgorithm("decryptType pkcs1 is disabled on this server")
        return Algorithm.RSA_PKCS1_V1_5


def _context(request: web.BaseRequest, request_id: str, actor: Actor) -> RequestContext:
    return platform_context(request_id, actor, client_of(request), request.headers.get("PureCloud-User-Id"))


def platform_context(request_id: str, actor: Actor, client: str | None, user_header: str | None) -> RequestContext:
    """The service's view of a platform request."""
    return RequestContext(request_id=request_id, actor=actor, client=client,
                          platform_user_id=_platform_user(user_header), route=LISTENER)


def _claimed_hawk_id(authorization: str | None) -> str | None:
    """The id an unverified caller claims, for the audit trail; only if it looks like an id we could issue."""
    try:
        claimed = parse_authorization(authorization or "").get("id")
    except HawkError:
        return None
    if claimed and len(claimed) <= 64 and all(c.isalnum() or c in "._-" for c in claimed):
        return claimed
    return None


def _platform_user(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip()
    # Recorded in the audit trail: keep it to something UUID-like, never arbitrary text.
    if len(value) > 64 or not all(c.isalnum() or c == "-" for c in value):
        return "invalid"
    return value


def platform_server(handler: PlatformHandler, **protocol_options: Any) -> web.Server:
    """aiohttp's low-level server around the handler; `protocol_options` go to aiohttp's RequestHandler."""
    return web.Server(handler, access_log=None, **protocol_options)
