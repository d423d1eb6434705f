"""lkm's JSON API behind mutual TLS: who the caller is, key listing, and single unwrap.

    GET  /v1/keys               every key, without public halves
    GET  /v1/keys/{id}          one key with its public key (PEM, PKCS#1, JWK)
    POST /v1/keys/{id}/unwrap   {"wrapped_key", "algorithm"?} -> {"id", "key"}   (unwrap role)

The administration routes (`lkm.web.admin`) and batch unwrap (`lkm.web.batch`) join this application.
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from lkm.audit.record import AuditAction
from lkm.auth import Actor, ActorKind, ClientPolicy
from lkm.errors import Forbidden, InvalidRequest, Unauthenticated
from lkm.keys import Algorithm, b64, parse_key_id
from lkm.roles import Role
from lkm.web.plumbing import (
    ACTOR,
    SERVICE,
    WebContext,
    actor_context,
    application,
    decode_b64,
    key_json,
    native_context,
    parse_json_object,
    read_body,
)
from lkm.web.routes import ListenerName, Route


def native_identity_middleware(policy: ClientPolicy) -> Middleware:
    """Admits callers whose verified certificate the allow list names and who are not frozen (403
    `caller_frozen` on every route); audits every refusal within the caller's budget of denial records."""

    @web.middleware
    async def identify(request: web.Request, handler: Handler) -> web.StreamResponse:
        ctx = request.app[SERVICE]
        ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if not der:
            ctx.observer.auth_failure(ActorKind.MTLS, "no_certificate")
            raise Unauthenticated("a client certificate is required", code="no_client_certificate")
        actor = policy.identify(der)
        if actor is None:
            ctx.observer.auth_failure(ActorKind.MTLS, "unknown_client")
            stranger = Actor(kind=ActorKind.MTLS, name="unlisted")
            error = Forbidden("this client certificate is not on the allow list", code="unknown_client")
            await ctx.service.audit_denial(native_context(request, stranger), AuditAction.AUTHENTICATE, error)
            raise error
        request[ACTOR] = actor
        try:
            if ctx.service.guard is not None:  # a caller frozen in mode stop gets nothing: no listing, no admin
                ctx.service.guard.refuse_frozen(actor)
            return await handler(request)
        except Forbidden as exc:
            if exc.code == "forbidden_role":
                ctx.observer.auth_failure(ActorKind.MTLS, "forbidden_role")
            await ctx.service.audit_denial(native_context(request, actor), AuditAction.AUTHORIZE, exc,
                                           key_id=_valid_key_id(request.match_info.get("id")))
            raise

    return identify


def _valid_key_id(value: str | None) -> str | None:
    """A key id from the URL for the audit trail, only if it is one: raw URL text never goes there."""
    try:
        return parse_key_id(value) if value is not None else None
    except InvalidRequest:
        return None


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
    app = application(wctx, ListenerName.NATIVE, native_identity_middleware(policy),
                      client_max_size=wctx.max_body_bytes)
    app.router.add_get(Route.KEYS, list_keys)
    app.router.add_get(Route.KEY, get_key)
    app.router.add_post(Route.KEY_UNWRAP, unwrap)
    return app
