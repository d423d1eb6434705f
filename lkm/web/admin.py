"""Key administration on the native (mutual TLS) listener: lkm's own routes and the platform sample's.

    POST /v1/keys                          create a key (body optional: {"label"})
    POST /v1/keys/rotate                   rotate (body optional: {"label"})
    POST /v1/keys/{id}/activate            pending_activation -> active (the platform has the key)
    POST /v1/keys/{id}/disable             body optional: {"force": true} to cut off the active key
    POST /v1/keys/{id}/enable
    POST /v1/keys/{id}/schedule-destruction   body optional: {"days": N} (default 30, at least 7)
    POST /v1/keys/{id}/cancel-destruction
    POST /key-management/v1/keypair        the sample's admin routes, kept so operators' runbooks work:
    GET  /key-management/v1/keypair        {"id", "publicKey", "dateCreated"} (epoch ms), a list for GET
    GET  /key-management/v1/keypair/{id}

Changes need the admin role, the sample's GETs the read role. Destruction itself is not offered here: it is
the CLI's alone, on the key store's host (`lkm keys destroy`). Handlers only translate; lkm.keyadmin decides.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from lkm.errors import InvalidRequest
from lkm.keyadmin import KeyAdmin
from lkm.keys import KeyRecord, parse_key_id, public_pkcs1_b64
from lkm.lifecycle import DEFAULT_DESTRUCTION_DAYS
from lkm.web.plumbing import SERVICE, actor_context, key_json, parse_json_object, read_body
from lkm.web.routes import Route

KEY_ADMIN = web.AppKey("key_admin", KeyAdmin)


def install_admin_routes(app: web.Application, admin: KeyAdmin) -> None:
    app[KEY_ADMIN] = admin
    app.router.add_post(Route.KEYS, create_key)
    app.router.add_post(Route.ROTATE, rotate)
    app.router.add_post(Route.ACTIVATE, activate)
    app.router.add_post(Route.DISABLE, disable)
    app.router.add_post(Route.ENABLE, enable)
    app.router.add_post(Route.SCHEDULE_DESTRUCTION, schedule_destruction)
    app.router.add_post(Route.CANCEL_DESTRUCTION, cancel_destruction)
    app.router.add_post(Route.SAMPLE_KEYPAIRS, sample_create)
    app.router.add_get(Route.SAMPLE_KEYPAIRS, sample_list)
    app.router.add_get(Route.SAMPLE_KEYPAIR, sample_get)


async def _body(request: web.Request) -> dict[str, Any]:
    """An optional JSON object: an empty body means no options."""
    raw = await read_body(request, request.app[SERVICE].max_body_bytes)
    return parse_json_object(raw) if raw.strip() else {}


def _label(body: dict[str, Any]) -> str:
    label = body.get("label", "")
    if not isinstance(label, str) or len(label) > 200:
        raise InvalidRequest("label must be a string of at most 200 characters", code="invalid_label")
    return label


def _key_id(request: web.Request) -> str:
    return parse_key_id(request.match_info["id"])


def _reply(record: KeyRecord, status: int = 200) -> web.Response:
    return web.json_response(key_json(record, with_public=True), status=status)


async def create_key(request: web.Request) -> web.StreamResponse:
    label = _label(await _body(request))
    record = await request.app[KEY_ADMIN].create(actor_context(request), label=label)
    return _reply(record, 201)


async def rotate(request: web.Request) -> web.StreamResponse:
    label = _label(await _body(request))
    record = await request.app[KEY_ADMIN].rotate(actor_context(request), label=label)
    return _reply(record, 201)


async def activate(request: web.Request) -> web.StreamResponse:
    return _reply(await request.app[KEY_ADMIN].activate(actor_context(request), _key_id(request)))


async def disable(request: web.Request) -> web.StreamResponse:
    force = (await _body(request)).get("force", False)
    if not isinstance(force, bool):
        raise InvalidRequest("force must be true or false", code="invalid_force")
    return _reply(await request.app[KEY_ADMIN].disable(actor_context(request), _key_id(request), force=force))


async def enable(request: web.Request) -> web.StreamResponse:
    return _reply(await request.app[KEY_ADMIN].enable(actor_context(request), _key_id(request)))


async def schedule_destruction(request: web.Request) -> web.StreamResponse:
    days = (await _body(request)).get("days", DEFAULT_DESTRUCTION_DAYS)
    if isinstance(days, bool) or not isinstance(days, int):
        raise InvalidRequest("days must be a whole number of days", code="invalid_waiting_period")
    record = await request.app[KEY_ADMIN].schedule_destruction(actor_context(request), _key_id(request), days)
    return _reply(record)


async def cancel_destruction(request: web.Request) -> web.StreamResponse:
    return _reply(await request.app[KEY_ADMIN].cancel_destruction(actor_context(request), _key_id(request)))


# --- the sample's routes -------------------------------------------------------------------------------------

def sample_keypair(record: KeyRecord) -> dict[str, Any]:
    """The sample's Keypair JSON (its private key is @JsonIgnore'd there too)."""
    return {"id": record.id, "publicKey": public_pkcs1_b64(record.public_key_der),
            "dateCreated": int(record.created.timestamp() * 1000)}


async def sample_create(request: web.Request) -> web.StreamResponse:
    record = await request.app[KEY_ADMIN].create(actor_context(request))
    return web.json_response(sample_keypair(record))


async def sample_list(request: web.Request) -> web.StreamResponse:
    records = await request.app[SERVICE].service.list_keys(actor_context(request))
    return web.json_response([sample_keypair(r) for r in records])


async def sample_get(request: web.Request) -> web.StreamResponse:
    record = await request.app[SERVICE].service.get_key(actor_context(request), _key_id(request))
    return web.json_response(sample_keypair(record))
