"""The whole server on a real SoftHSM2 token: the same routes, readiness and recovery as on the file store."""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import Callable
from pathlib import Path

from lkm.keys import KeyState
from tests.conftest import OAEP_SHA256, Pki, eventually, start_server, wrap
from tests.hsm import SoftHsmToken


def hsm_config(factory: Callable[..., Path], token: SoftHsmToken, **overrides: object) -> Path:
    return factory(keystore={"type": "pkcs11", "module": str(token.module), "token_label": token.label,
                             "pin": {"file": str(token.pin_file)}, "pool_size": 2}, **overrides)


async def test_platform_route_on_the_hsm_and_recovery(tmp_path: Path, certs: Pki,
                                                      config_factory: Callable[..., Path],
                                                      softhsm_token: SoftHsmToken) -> None:
    async with start_server(tmp_path, certs, hsm_config(config_factory, softhsm_token)) as running:
        record = await asyncio.to_thread(running.create_key)
        assert record.backend == "pkcs11"
        reply = await running.platform().decrypt(record.id, wrap(record, b"h" * 32))
        assert reply.status == 200 and base64.b64decode(reply.body["body"]) == b"h" * 32

        # OAEP-SHA256 is not offered by SoftHSM 2.6: said plainly, per request.
        native = await running.native("admin").unwrap(record.id, wrap(record, b"s" * 32, OAEP_SHA256),
                                                       "RSA-OAEP-SHA256")
        if native.status != 200:
            assert native.status == 400
            assert native.body["error"] == {"code": "unsupported_algorithm",
                                            "message": "this key store does not support RSA-OAEP-SHA256"}
        # PKCS#1 v1.5 on this store is refused unless the config allows it (padding oracle).
        refused = await running.platform().decrypt(record.id, os.urandom(384), pkcs1=True)
        assert refused.status == 400 and "does not support" in refused.body["message"]

        await running.server.update_readiness(force_canary=True)
        assert running.server.readiness.ready

        # The token goes away: 503 with Retry-After, readiness false; it comes back: served again, no restart.
        away = softhsm_token.token_dir.with_name(softhsm_token.token_dir.name + ".away")
        softhsm_token.token_dir.rename(away)
        try:
            reply = await running.platform().decrypt(record.id, wrap(record, b"x" * 32))
            assert reply.status == 503 and reply.headers.get("Retry-After")
            await running.server.update_readiness(force_canary=True)
            async with running.session.get(running.url("ops") + "/readyz") as resp:
                assert resp.status == 503
                assert (await resp.json())["checks"]["keystore"]["ok"] is False
        finally:
            away.rename(softhsm_token.token_dir)
        for _ in range(30):
            reply = await running.platform().decrypt(record.id, wrap(record, b"y" * 32))
            if reply.status == 200:
                break
            await asyncio.sleep(0.2)
        assert reply.status == 200 and base64.b64decode(reply.body["body"]) == b"y" * 32
        # A background refresh that met the token half back waits out its retry delay (up to a second) before
        # the store reports itself healthy again; readiness follows within it.

        async def ready() -> bool:
            await running.server.update_readiness(force_canary=True)
            return running.server.readiness.ready

        assert await eventually(ready, within=6)


async def test_concurrent_unwraps_through_the_server(tmp_path: Path, certs: Pki,
                                                     config_factory: Callable[..., Path],
                                                     softhsm_token: SoftHsmToken) -> None:
    # A generous deadline: this test is about correctness under concurrency, not load shedding.
    config = hsm_config(config_factory, softhsm_token, **{"limits.request_deadline_ms": 30_000,
                                                          "limits.worker_threads": 5})
    async with start_server(tmp_path, certs, config) as running:
        admission = running.server.service.admission if running.server.service else None
        assert admission is not None and admission.workers == 2  # one operation per session, 2 sessions
        record = await asyncio.to_thread(running.create_key)
        secrets_ = [os.urandom(32) for _ in range(120)]
        client = running.platform()
        replies = await asyncio.gather(*(client.decrypt(record.id, wrap(record, s)) for s in secrets_))
        assert [base64.b64decode(r.body["body"]) for r in replies] == secrets_


async def test_a_token_away_since_start_up_lists_no_keys_until_it_is_read(tmp_path: Path, certs: Pki,
                                                                          config_factory: Callable[..., Path],
                                                                          softhsm_token: SoftHsmToken) -> None:
    """Not an empty list: an operator would take that for lost keys (and the schedule for a rotation due)."""
    store = softhsm_token.store()
    try:
        key_id = store.create_key(state=KeyState.ACTIVE, label="made before the server").id
    finally:
        store.close()
    away = tmp_path / "token-away"  # out of SoftHSM2's token directory, which it scans whole
    softhsm_token.token_dir.rename(away)
    try:
        async with start_server(tmp_path, certs, hsm_config(config_factory, softhsm_token)) as running:
            native = running.native("admin")
            listing = await native.request("GET", "/v1/keys")
            assert listing.status == 503 and listing.body["error"]["code"] == "keystore_unavailable", listing.body
            await running.server.update_readiness(force_canary=True)
            assert not running.server.readiness.ready
            assert running.server.readiness.checks["keystore"][0] is False
            away.rename(softhsm_token.token_dir)

            async def listed() -> bool:
                reply = await native.request("GET", "/v1/keys")
                return reply.status == 200 and [k["id"] for k in reply.body["keys"]] == [key_id]

            async def ready() -> bool:
                await running.server.update_readiness(force_canary=True)
                return running.server.readiness.ready

            assert await eventually(listed, within=10)
            assert await eventually(ready, within=6)
    finally:
        if away.exists():
            away.rename(softhsm_token.token_dir)
