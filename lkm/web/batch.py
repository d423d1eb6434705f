"""Batch unwrap on the native (mutual TLS) listener, for bulk export.

    POST /v1/unwrap   {"items": [{"id", "wrapped_key", "algorithm"?}, ...]}   (at most native.max_batch items)
    200               {"results": [{"id", "key"} | {"id", "error": {"code", "message"}}, ...], "request_id"}

Results come in the order of the items. An item's own problem (bad id, bad base64, unknown key, failed
decryption) is its result and never fails the others; the request as a whole fails only when it is malformed,
too large (413 `batch_too_large`), lacks the unwrap role, or the server is overloaded (503). Handlers only
translate; lkm.service decides.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from lkm.errors import InvalidRequest, LkmError, PayloadTooLarge
from lkm.keys import Algorithm, b64, parse_key_id
from lkm.roles import Role
from lkm.service import UnwrapItem
from lkm.web.plumbing import REQUEST_ID, SERVICE, actor_context, decode_b64, parse_json_object, read_body
from lkm.web.routes import Route

MAX_BATCH = web.AppKey("max_batch", int)
ITEM_BYTES = 1024
"""Body allowance per item: a 512-character wrapped key, a key id, an algorithm and JSON punctuation fit."""


def install_batch_route(app: web.Application, max_batch: int) -> None:
    app[MAX_BATCH] = max_batch
    app.router.add_post(Route.BATCH_UNWRAP, unwrap_batch)


def _item(raw: object) -> UnwrapItem | LkmError:
    try:
        if not isinstance(raw, dict):
            raise InvalidRequest("each item must be a JSON object", code="invalid_item")
        return UnwrapItem(key_id=parse_key_id(raw.get("id")),
                          ciphertext=decode_b64(raw.get("wrapped_key"), "wrapped_key"),
                          algorithm=Algorithm.parse(raw.get("algorithm", Algorithm.RSA_OAEP_SHA1.value)))
    except LkmError as exc:
        return exc


def _result(raw: object, result: bytes | LkmError) -> dict[str, Any]:
    # Echo the caller's id when it is a string (even a malformed one) so it can match results to items.
    item_id = raw.get("id") if isinstance(raw, dict) and isinstance(raw.get("id"), str) else None
    if isinstance(result, LkmError):
        return {"id": item_id, "error": {"code": result.code, "message": result.message}}
    return {"id": item_id, "key": b64(result)}


async def unwrap_batch(request: web.Request) -> web.StreamResponse:
    ctx = request.app[SERVICE]
    max_batch = request.app[MAX_BATCH]
    rctx = actor_context(request)
    rctx.actor.require(Role.UNWRAP)
    limit = max(ctx.max_body_bytes, max_batch * ITEM_BYTES)
    try:
        body = await read_body(request, limit)
    except PayloadTooLarge:
        raise PayloadTooLarge(f"a batch body is at most {limit} bytes ({max_batch} items)",
                              code="batch_too_large") from None
    items = parse_json_object(body).get("items")
    if not isinstance(items, list) or not items:
        raise InvalidRequest("items must be a non-empty list of {id, wrapped_key, algorithm}",
                             code="invalid_batch")
    if len(items) > max_batch:
        raise PayloadTooLarge(f"a batch holds at most {max_batch} items, got {len(items)}",
                              code="batch_too_large")
    results = await ctx.service.unwrap_batch(rctx, [_item(raw) for raw in items])
    return web.json_response({"results": [_result(raw, result) for raw, result in zip(items, results, strict=True)],
                              "request_id": request[REQUEST_ID]})
