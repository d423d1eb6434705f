"""Key administration over the native mTLS API (lkm's routes and the sample's), and what unwraps say about keys
that are disabled or destroyed."""

from __future__ import annotations

import base64
from datetime import timedelta

import pytest

from lkm import lifecycle
from lkm.keys import KeyState, public_pkcs1_b64, utcnow
from tests.conftest import VECTORS, Running, b64, vector_key, wrap

V0 = "3f0c8c1e-6a55-4a4e-9a0e-2b8f2f1f6d11"


@pytest.mark.slow
async def test_admin_walks_a_key_through_its_states(running: Running) -> None:
    admin = running.native("admin")
    first = await admin.request("POST", "/v1/keys", {"label": "first"})
    assert first.status == 201 and first.body["state"] == "active" and first.body["label"] == "first"
    second = await admin.request("POST", "/v1/keys")
    assert second.status == 201 and second.body["state"] == "pending_activation"
    a, b = first.body["id"], second.body["id"]

    activated = await admin.request("POST", f"/v1/keys/{b}/activate")
    assert activated.status == 200 and activated.body["state"] == "active"
    assert running.store.get_key(a).state is KeyState.RETIRED

    refused = await admin.request("POST", f"/v1/keys/{b}/disable")
    assert refused.status == 409 and refused.body["error"]["code"] == "illegal_transition"
    assert "cannot go from active to disabled" in refused.body["error"]["message"]

    disabled = await admin.request("POST", f"/v1/keys/{a}/disable", {})
    assert disabled.status == 200 and disabled.body["state"] == "disabled"
    record = running.store.get_key(a)
    blocked = await running.native("unwrapper").unwrap(a, wrap(record, b"k" * 32))
    assert blocked.status == 409 and blocked.body["error"]["code"] == "key_disabled"
    assert "disabled" in blocked.body["error"]["message"]

    short = await admin.request("POST", f"/v1/keys/{a}/schedule-destruction", {"days": 3})
    assert short.status == 400 and short.body["error"]["code"] == "invalid_waiting_period"
    scheduled = await admin.request("POST", f"/v1/keys/{a}/schedule-destruction", {"days": 7})
    assert scheduled.status == 200 and scheduled.body["state"] == "pending_destruction"
    assert scheduled.body["destroy_after"] > (utcnow() + timedelta(days=6)).isoformat()
    stuck = await admin.request("POST", f"/v1/keys/{a}/enable")
    assert stuck.status == 409 and "cancel the destruction first" in stuck.body["error"]["message"]
    cancelled = await admin.request("POST", f"/v1/keys/{a}/cancel-destruction")
    assert cancelled.status == 200 and cancelled.body["state"] == "disabled"
    enabled = await admin.request("POST", f"/v1/keys/{a}/enable")
    assert enabled.status == 200 and enabled.body["state"] == "retired"
    again = await running.native("unwrapper").unwrap(a, wrap(record, b"k" * 32))
    assert again.status == 200 and again.body["key"] == b64(b"k" * 32)

    rotated = await admin.request("POST", "/v1/keys/rotate")
    assert rotated.status == 201 and rotated.body["state"] == "active"  # no genesys section: active at once
    assert running.store.get_key(b).state is KeyState.RETIRED

    records = [e for e in running.audit_lines() if e["action"] != "unwrap"]
    intents = {e["intent"] for e in records if e["outcome"] == "intent"}
    outcomes = [e for e in records if e["outcome"] != "intent"]
    assert intents == {e["intent"] for e in outcomes}  # every change announced, and each announcement closed
    actions = [(e["action"], e["outcome"], e.get("from_state"), e.get("to_state")) for e in outcomes]
    assert actions == [
        ("create_key", "ok", None, "active"),
        ("create_key", "ok", None, "pending_activation"),
        ("activate_key", "ok", "pending_activation", "active"),
        ("disable_key", "error", "active", "disabled"),
        ("disable_key", "ok", "retired", "disabled"),
        ("schedule_destruction", "error", None, None),
        ("schedule_destruction", "ok", "disabled", "pending_destruction"),
        ("enable_key", "error", "pending_destruction", None),
        ("cancel_destruction", "ok", "pending_destruction", "disabled"),
        ("enable_key", "ok", "disabled", "retired"),
        ("rotate_key", "ok", "pending_activation", "active"),
    ]
    denied = [e for e in running.audit_lines() if e["action"] == "unwrap" and e["outcome"] == "error"]
    assert [e["error_code"] for e in denied] == ["key_disabled"]


async def test_only_admins_change_keys(running: Running) -> None:
    record = running.create_key()
    for who in ("reader", "unwrapper"):
        client = running.native(who)
        for path in ("/v1/keys", "/v1/keys/rotate", f"/v1/keys/{record.id}/disable",
                     "/key-management/v1/keypair"):
            reply = await client.request("POST", path)
            assert reply.status == 403 and reply.body["error"]["code"] == "forbidden_role", (who, path)
    assert [k.id for k in running.store.list_keys()] == [record.id]
    refused = [e for e in running.audit_lines() if e["outcome"] == "error"]
    assert {e["error_code"] for e in refused} == {"forbidden_role"} and len(refused) == 8


async def test_the_samples_admin_routes(running: Running) -> None:
    admin = running.native("admin")
    created = await admin.request("POST", "/key-management/v1/keypair")
    assert created.status == 200 and set(created.body) == {"id", "publicKey", "dateCreated"}
    record = running.store.get_key(created.body["id"])
    assert created.body["publicKey"] == public_pkcs1_b64(record.public_key_der)
    assert created.body["publicKey"].startswith("MIIBigKCAYEA")
    assert created.body["dateCreated"] == int(record.created.timestamp() * 1000)
    listing = await running.native("reader").request("GET", "/key-management/v1/keypair")
    assert listing.status == 200 and listing.body == [created.body]  # a JSON array, as the sample answers
    one = await running.native("reader").request("GET", f"/key-management/v1/keypair/{record.id}")
    assert one.status == 200 and one.body == created.body
    missing = await running.native("reader").request("GET", "/key-management/v1/keypair/"
                                                            "00000000-0000-4000-8000-000000000000")
    assert missing.status == 404 and missing.body["error"]["code"] == "key_not_found"


async def test_a_destroyed_key_says_destroyed_on_both_routes(running: Running) -> None:
    vector = VECTORS["vectors"][0]
    running.store.import_key(V0, vector_key(0),
                             state=KeyState.RETIRED)
    t0 = utcnow()
    lifecycle.disable(running.store, V0, now=t0)
    lifecycle.schedule_destruction(running.store, V0, days=7, now=t0)
    lifecycle.destroy(running.store, V0, now=t0 + timedelta(days=8))
    ciphertext = base64.b64decode(vector["ciphertext_b64"])
    native = await running.native("unwrapper").unwrap(V0, ciphertext)
    assert native.status == 409 and native.body["error"]["code"] == "key_destroyed"
    assert "destroyed" in native.body["error"]["message"]
    platform = await running.platform().decrypt(V0, ciphertext)
    assert platform.status == 400 and platform.body == {"message": "key has been destroyed", "status": 400}
    unwraps = [e for e in running.audit_lines() if e["action"] == "unwrap"]
    assert [(e["route"], e["error_code"]) for e in unwraps] == [("native", "key_destroyed"),
                                                               ("platform", "key_destroyed")]


async def test_a_refused_rotation_is_not_a_failed_rotation(running: Running) -> None:
    """The rotation-failure alert watches lkm_rotations_total{outcome="failed"}: a caller without the admin
    role must not trip it."""
    running.create_key(KeyState.ACTIVE)
    reply = await running.native("reader").request("POST", "/v1/keys/rotate")
    assert reply.status == 403 and reply.body["error"]["code"] == "forbidden_role"
    async with running.session.get(running.url("ops") + "/metrics") as resp:
        text = await resp.text()
    failed = [line for line in text.splitlines() if line.startswith('lkm_rotations_total{outcome="failed"}')]
    assert failed == ['lkm_rotations_total{outcome="failed"} 0.0']
