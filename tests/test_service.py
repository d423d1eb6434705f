"""The use cases of lkm.service and lkm.keyadmin against a real file store, without HTTP."""

from __future__ import annotations

import base64
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from lkm.auth import Actor
from lkm.errors import Forbidden, IllegalTransition, KeyUnusable, Unavailable
from lkm.keyadmin import KeyAdmin
from lkm.keys import Algorithm, KeyState
from lkm.keystore.file import FileKeyStore
from lkm.roles import Role
from lkm.service import KeyService, RequestContext, in_store
from tests.conftest import TEST_SCRYPT_N, Running, b64, wrap
from tests.test_lifecycle import V0, VECTORS, add


class Trail:
    """An audit sink that keeps the events, as the audit log would receive them."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    async def record(self, event: dict[str, Any]) -> None:
        self.events.append(dict(event))


def context(*roles: Role) -> RequestContext:
    return RequestContext(request_id="r1", actor=Actor(kind="mtls", name="tester", roles=frozenset(roles)))


@pytest.fixture
def store(tmp_path: Path) -> FileKeyStore:
    return FileKeyStore(tmp_path / "keys", b"service test passphrase", scrypt_n=TEST_SCRYPT_N)


@pytest.fixture
async def service(store: FileKeyStore) -> Any:
    with ThreadPoolExecutor(2) as pool:
        yield KeyService(store, Trail(), pool)


async def test_unwrap_of_a_vector_is_audited_with_its_algorithm(store: FileKeyStore, service: KeyService) -> None:
    add(store, 0, KeyState.ACTIVE)
    vector = VECTORS["vectors"][0]
    plain = await service.unwrap(context(Role.UNWRAP), V0, base64.b64decode(vector["ciphertext_b64"]),
                                 Algorithm.RSA_OAEP_SHA1)
    assert plain
    [event] = service.audit.events  # type: ignore[attr-defined]
    assert event["action"] == "unwrap" and event["outcome"] == "ok" and event["key_id"] == V0
    assert event["algorithm"] == "RSA-OAEP-SHA1" and event["actor"]["name"] == "tester"
    assert "latency_ms" in event and "error_code" not in event


async def test_unwrap_with_a_disabled_key_is_refused_and_audited(store: FileKeyStore, service: KeyService) -> None:
    add(store, 0, KeyState.DISABLED)
    with pytest.raises(KeyUnusable):
        await service.unwrap(context(Role.UNWRAP), V0, bytes(384), Algorithm.RSA_OAEP_SHA1)
    [event] = service.audit.events  # type: ignore[attr-defined]
    assert event["outcome"] == "error" and event["error_code"] == "key_disabled"


@pytest.mark.slow
async def test_create_and_rotate_through_the_admin_use_cases(store: FileKeyStore, service: KeyService) -> None:
    admin = KeyAdmin(service, rotation=None, genesys_settings=None)
    first = await admin.create(context(Role.ADMIN))
    assert first.state is KeyState.ACTIVE
    second = await admin.rotate(context(Role.ADMIN))
    assert second.state is KeyState.ACTIVE and store.get_key(first.id).state is KeyState.RETIRED
    create_intent, create, rotate_intent, rotate = service.audit.events  # type: ignore[attr-defined]
    # Each change is announced before it is made, naming the key it will create; its outcome names the intent.
    assert (create_intent["outcome"], create_intent["key_id"]) == ("intent", first.id)
    assert (rotate_intent["outcome"], rotate_intent["key_id"]) == ("intent", second.id)
    assert create["intent"] == create_intent["intent"] and rotate["intent"] == rotate_intent["intent"]
    assert create["action"] == "create_key" and create["to_state"] == "active"
    assert rotate["action"] == "rotate_key" and rotate["previous_active"] == first.id
    assert rotate["retired"] == first.id and rotate["key_id"] == second.id


async def test_a_refused_change_is_audited_with_what_was_asked(store: FileKeyStore, service: KeyService) -> None:
    admin = KeyAdmin(service, rotation=None, genesys_settings=None)
    add(store, 0, KeyState.ACTIVE)
    with pytest.raises(IllegalTransition):
        await admin.disable(context(Role.ADMIN), V0)
    with pytest.raises(Forbidden):
        await admin.disable(context(Role.READ), V0, force=True)
    intent, refused, forbidden = service.audit.events  # type: ignore[attr-defined]
    assert intent["outcome"] == "intent" and refused["intent"] == intent["intent"]  # no intent without a role
    assert refused["error_code"] == "illegal_transition"
    assert (refused["from_state"], refused["to_state"]) == ("active", "disabled")
    assert forbidden["error_code"] == "forbidden_role" and store.get_key(V0).state is KeyState.ACTIVE


def test_key_store_trouble_is_unavailable_whoever_calls(store: FileKeyStore) -> None:
    from lkm.errors import KeyStoreError

    def broken() -> None:
        raise KeyStoreError("disk on fire /secret/path")

    with pytest.raises(Unavailable) as caught:
        in_store(broken)
    assert caught.value.code == "keystore_unavailable" and "secret" not in caught.value.message


FLOOD = 60


def _trail_bytes(running: Running) -> int:
    return Path(running.server.settings.audit.path).stat().st_size


@pytest.mark.slow
async def test_an_authenticated_caller_cannot_flood_the_audit_trail(running: Running) -> None:
    """Each refusal path, flooded by a caller with valid credentials: a burst of records, then a trickle."""
    record = running.create_key()
    await running.server.refresh()
    reader, unwrapper, exporter = running.native("reader"), running.native("unwrapper"), running.native("admin")
    wrapped = b64(wrap(record, b"k" * 32))
    paths = {
        "forbidden rotate": lambda: reader.request("POST", "/v1/keys/rotate", {}),
        "forbidden unwrap": lambda: reader.unwrap(record.id, wrap(record, b"k" * 32)),
        "unknown key": lambda: unwrapper.unwrap(str(uuid.uuid4()), wrap(record, b"k" * 32)),
        # Another caller, so its first batches fall in a fresh burst of its own budget.
        "batch of unknown keys": lambda: exporter.request("POST", "/v1/unwrap", {"items": [
            {"id": str(uuid.uuid4()), "wrapped_key": wrapped, "algorithm": "RSA-OAEP-SHA1"} for _ in range(100)]}),
    }
    growth: dict[str, tuple[int, int]] = {}
    for name, send in paths.items():
        before_bytes, before_lines = _trail_bytes(running), len(running.audit_lines())
        started = time.monotonic()
        for _ in range(FLOOD):
            reply = await send()
            assert reply.status in (200, 403, 404), (name, reply.status, reply.body)
        elapsed = time.monotonic() - started
        written = len(running.audit_lines()) - before_lines
        growth[name] = (written, _trail_bytes(running) - before_bytes)
        # Each caller's budget is its own and refills at 2 a second, so each path may spend a fresh burst.
        assert written <= 20 + 2 * elapsed + 1, (name, written, elapsed)
    assert all(size < 20_000 for _, size in growth.values()), growth
    print("audit growth per flood of", FLOOD, growth)
    # The batch path: one record per batch, not one per item.
    batches = [e for e in running.audit_lines() if e.get("route") == "batch"]
    assert batches and all(e["items"] == 100 and e["errors"] == {"key_not_found": 100} for e in batches)
    # Real work is still audited in full.
    assert (await unwrapper.unwrap(record.id, wrap(record, b"g" * 32))).status == 200
    assert running.audit_lines()[-1]["outcome"] == "ok"
