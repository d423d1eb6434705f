"""Batch unwrap on the native API: per-item answers in order, one bad item never fails the others."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from lkm.keys import KeyState
from tests.conftest import OAEP_SHA256, Pki, Running, b64, start_server, wrap
from tests.test_observer import scrape, value


def _item(key_id: str, wrapped: bytes | str, algorithm: str | None = "RSA-OAEP-SHA1") -> dict[str, object]:
    item: dict[str, object] = {"id": key_id, "wrapped_key": wrapped if isinstance(wrapped, str) else b64(wrapped)}
    if algorithm is not None:
        item["algorithm"] = algorithm
    return item


async def test_mixed_batch_answers_each_item_in_order(running: Running) -> None:
    active = running.create_key()
    disabled = running.create_key(KeyState.RETIRED)
    running.store.save_record(disabled.with_changes(state=KeyState.DISABLED))
    secrets = [os.urandom(32) for _ in range(4)]
    items = [
        _item(active.id, wrap(active, secrets[0])),
        _item(active.id, "@@not base64@@"),
        _item("00000000-0000-4000-8000-000000000000", wrap(active, secrets[1])),
        _item(active.id, wrap(active, secrets[2], OAEP_SHA256), "RSA-OAEP-SHA256"),
        _item(active.id, os.urandom(384)),
        _item(disabled.id, wrap(disabled, secrets[3])),
        _item("not-a-uuid", wrap(active, secrets[3])),
        _item(active.id, b"short"),
        _item(active.id, wrap(active, secrets[3]), "RSA-OAEP-MD5"),
        _item(active.id.upper(), wrap(active, secrets[3]), None),
    ]
    reply = await running.native("unwrapper").request("POST", "/v1/unwrap", {"items": items})
    assert reply.status == 200, reply.body
    results = reply.body["results"]
    assert [r["id"] for r in results] == [i["id"] for i in items]
    assert results[0]["key"] == b64(secrets[0])
    assert results[3]["key"] == b64(secrets[2])
    assert results[9]["key"] == b64(secrets[3])
    codes = [r.get("error", {}).get("code") for r in results]
    assert codes == [None, "invalid_base64", "key_not_found", None, "decryption_failed", "key_disabled",
                     "invalid_key_id", "invalid_ciphertext_length", "unsupported_algorithm", None]
    assert all(r["error"]["message"] for r in results if "error" in r)
    assert reply.body["request_id"] == reply.headers["X-Request-Id"]


async def test_a_batch_is_one_audit_record_with_counts_and_each_item_is_counted(running: Running) -> None:
    record = running.create_key()
    await running.server.refresh()
    before = await scrape(running)
    items = [_item(record.id, wrap(record, os.urandom(32))) for _ in range(3)] + [_item(record.id, os.urandom(384))]
    reply = await running.native("unwrapper").request("POST", "/v1/unwrap", {"items": items})
    assert reply.status == 200
    [batch] = [e for e in running.audit_lines() if e.get("action") == "unwrap"]
    assert (batch["route"], batch["outcome"], batch["items"], batch["ok"]) == ("batch", "ok", 4, 3)
    assert batch["key_ids"] == {record.id: 3} and batch["errors"] == {"decryption_failed": 1}
    assert batch["request_id"] == reply.headers["X-Request-Id"]
    after = await scrape(running)
    ok = "lkm_unwraps_total"
    assert value(after, ok, route="batch", outcome="ok") - value(before, ok, route="batch", outcome="ok") == 3
    assert value(after, ok, route="batch", outcome="decryption_failed") \
        - value(before, ok, route="batch", outcome="decryption_failed") == 1


async def test_batch_needs_the_unwrap_role(running: Running) -> None:
    record = running.create_key()
    reply = await running.native("reader").request("POST", "/v1/unwrap",
                                                   {"items": [_item(record.id, wrap(record, b"r" * 32))]})
    assert reply.status == 403 and reply.body["error"]["code"] == "forbidden_role"
    assert not [e for e in running.audit_lines() if e.get("action") == "unwrap"]


async def test_malformed_batches_are_refused_whole(running: Running) -> None:
    client = running.native("admin")
    for payload in [{}, {"items": []}, {"items": "nope"}, [1]]:
        reply = await client.request("POST", "/v1/unwrap", payload)
        assert reply.status == 400, payload
        assert reply.body["error"]["code"] in ("invalid_batch", "invalid_json")
    reply = await client.request("POST", "/v1/unwrap", {"items": [42, {"id": 7}]})
    assert reply.status == 200
    assert [r["error"]["code"] for r in reply.body["results"]] == ["invalid_item", "invalid_key_id"]
    assert [r["id"] for r in reply.body["results"]] == [None, None]


async def test_too_many_items(tmp_path: Path, certs: Pki, config_factory: Callable[..., Path]) -> None:
    async with start_server(tmp_path, certs, config_factory(**{"native.max_batch": 3})) as running:
        record = running.create_key()
        items = [_item(record.id, wrap(record, b"t" * 32)) for _ in range(4)]
        reply = await running.native("admin").request("POST", "/v1/unwrap", {"items": items})
        assert reply.status == 413 and reply.body["error"]["code"] == "batch_too_large"
        assert "3" in reply.body["error"]["message"]
        reply = await running.native("admin").request("POST", "/v1/unwrap", {"items": items[:3]})
        assert reply.status == 200 and all("key" in r for r in reply.body["results"])


async def test_full_batch_fits_the_body_limit(running: Running) -> None:
    # 100 items (the default native.max_batch) are larger than limits.max_body_bytes (64 KiB) allows.
    record = running.create_key()
    secret = os.urandom(32)
    wrapped = wrap(record, secret)
    items = [_item(record.id, wrapped) for _ in range(100)]
    reply = await running.native("admin").request("POST", "/v1/unwrap", {"items": items})
    assert reply.status == 200, reply.body
    assert all(r["key"] == b64(secret) for r in reply.body["results"])


async def test_a_batch_over_the_rate_limit_is_audited_within_the_denial_budget(
        tmp_path: Path, certs: Pki, config_factory: Callable[..., Path]) -> None:
    """A batch refused with 429 writes its record (route batch, rate_limited, the item count) like a refused
    single unwrap; a flood of refused batches writes the burst of 20 records, then at most 2 a second."""
    config = config_factory(**{"limits.rate_limits": {"per_second": 0.01, "burst": 3}})
    async with start_server(tmp_path, certs, config) as running:
        record = running.create_key()
        await running.server.refresh()
        native = running.native("unwrapper")
        items = [_item(record.id, wrap(record, os.urandom(32))) for _ in range(3)]
        assert (await native.request("POST", "/v1/unwrap", {"items": items})).status == 200
        flood = 50
        for _ in range(flood):
            reply = await native.request("POST", "/v1/unwrap", {"items": items[:2]})
            assert reply.status == 429 and reply.body["error"]["code"] == "rate_limited", reply.body
        refused = [e for e in running.audit_lines() if e.get("action") == "unwrap" and e["outcome"] == "error"]
        assert refused and all((e["route"], e["error_code"], e["items"]) == ("batch", "rate_limited", 2)
                               for e in refused)
        assert refused[0]["request_id"] and refused[0]["actor"]["name"] == "unwrapper"
        assert 20 <= len(refused) < 20 + flood // 4, len(refused)  # before: no record at all
