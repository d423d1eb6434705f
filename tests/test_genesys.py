"""Registration of new keys with the platform, against a stand-in platform API, through the real server and CLI."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from lkm.config import load_settings
from lkm.hawk import HawkCredential
from lkm.keys import KeyRecord, KeyState, public_pkcs1_b64
from lkm.keystore.file import FileKeyStore
from tests.conftest import Pki, Running, b64, eventually, start_server, vector_key, wrap
from tests.lkmcli import lkm_here
from tests.standin_platform import CONFIG_ID, StandinPlatform

OLD_ID = "3f0c8c1e-6a55-4a4e-9a0e-2b8f2f1f6d11"
PENDING_ID = "8d6c1f0a-2b3e-4c5d-8e9f-0a1b2c3d4e5f"


def import_old_active(running: Running) -> KeyRecord:
    """The key the platform uses today; imported from the public test vectors, which costs no key generation."""
    key = vector_key(0)
    record: KeyRecord = running.store.import_key(OLD_ID, key, state=KeyState.ACTIVE)
    return record


@pytest.fixture
async def standin(certs: Pki) -> AsyncIterator[StandinPlatform]:
    platform = StandinPlatform(certs.ca_file)
    await platform.start()
    yield platform
    await platform.stop()


@contextlib.asynccontextmanager
async def lkm_registering(tmp_path: Path, certs: Pki, config_factory: Callable[..., Path],
                          standin: StandinPlatform, **genesys: Any) -> AsyncIterator[Running]:
    config = config_factory(genesys=standin.genesys_config(tmp_path / "client.secret", **genesys))
    async with start_server(tmp_path, certs, config) as running:
        standin.connect(running.url("platform") + "/key-management/v1/decrypt", running.hawk)
        yield running


def events(running: Running, action: str) -> list[dict[str, Any]]:
    return [e for e in running.audit_lines() if e.get("action") == action and e["outcome"] != "intent"]


def registrations(running: Running, outcome: str) -> float:
    value = running.server.metrics.registry.get_sample_value("lkm_platform_registrations_total",
                                                             {"outcome": outcome})
    return value or 0.0


@pytest.mark.slow
async def test_rotation_registers_the_new_key_then_activates_it(
        tmp_path: Path, certs: Pki, config_factory: Callable[..., Path], standin: StandinPlatform) -> None:
    async with lkm_registering(tmp_path, certs, config_factory, standin) as running:
        old = import_old_active(running)
        reply = await running.native("admin").request("POST", "/v1/keys/rotate", {"label": "q3"})
        assert reply.status == 201, reply.body
        new_id = reply.body["id"]
        assert reply.body["state"] == "pending_activation"  # the platform does not have it yet

        # Activation is two writes (new key active, then the old one retired); its audit record follows both.
        assert await eventually(lambda: events(running, "activate_key"))
        assert running.store.get_key(new_id).state is KeyState.ACTIVE
        assert running.store.get_key(old.id).state is KeyState.RETIRED
        new = running.store.get_key(new_id)
        assert new.registered is not None
        # The platform got exactly what the contract says, and its test decrypt went through lkm.
        [registration] = standin.registrations
        assert registration.config_id == CONFIG_ID and registration.keypair_id == new_id
        assert registration.public_key == public_pkcs1_b64(new.public_key_der)
        assert registration.test_decrypt_status == 200
        assert [e["outcome"] for e in events(running, "register_key")] == ["ok"]
        activation = events(running, "activate_key")[-1]
        assert activation["key_id"] == new_id and activation["retired"] == old.id
        assert activation["actor"]["kind"] == "system"
        test_decrypt = [e for e in events(running, "unwrap") if e["key_id"] == new_id]
        assert test_decrypt and test_decrypt[0]["route"] == "platform" and test_decrypt[0]["outcome"] == "ok"
        assert registrations(running, "ok") == 1 and registrations(running, "failed") == 0


@pytest.mark.slow
async def test_bad_credentials_keep_the_previous_key_active(
        tmp_path: Path, certs: Pki, config_factory: Callable[..., Path], standin: StandinPlatform) -> None:
    (tmp_path / "wrong.secret").write_text("not the secret\n")
    async with lkm_registering(tmp_path, certs, config_factory, standin,
                               client_secret={"file": str(tmp_path / "wrong.secret")}) as running:
        old = import_old_active(running)
        reply = await running.native("admin").request("POST", "/v1/keys/rotate")
        new_id = reply.body["id"]
        assert await eventually(lambda: events(running, "register_key"))
        [failure] = events(running, "register_key")
        assert failure["outcome"] == "error" and failure["error_code"] == "platform_auth_failed"
        assert failure["retrying"] is False  # wrong credentials do not fix themselves: one attempt only
        assert standin.token_requests == 1 and standin.calls == 0
        assert running.store.get_key(old.id).state is KeyState.ACTIVE
        assert running.store.get_key(new_id).state is KeyState.PENDING_ACTIVATION
        assert registrations(running, "failed") == 1
        # The pending key serves unwraps all the same (the platform's test decrypt needs that).
        new = running.store.get_key(new_id)
        unwrapped = await running.native("unwrapper").unwrap(new_id, wrap(new, b"p" * 32))
        assert unwrapped.status == 200 and unwrapped.body["key"] == b64(b"p" * 32)


@pytest.mark.slow
async def test_server_errors_are_retried_with_backoff(
        tmp_path: Path, certs: Pki, config_factory: Callable[..., Path], standin: StandinPlatform) -> None:
    async with lkm_registering(tmp_path, certs, config_factory, standin) as running:
        import_old_active(running)
        standin.fail_next = [503, 500]
        reply = await running.native("admin").request("POST", "/v1/keys/rotate")
        new_id = reply.body["id"]
        assert await eventually(lambda: running.store.get_key(new_id).state is KeyState.ACTIVE)
        attempts = events(running, "register_key")
        assert [(e["attempt"], e["outcome"], e.get("error_code")) for e in attempts] == [
            (1, "error", "platform_unavailable"), (2, "error", "platform_unavailable"), (3, "ok", None)]
        assert standin.calls == 3 and registrations(running, "failed") == 2 and registrations(running, "ok") == 1


@pytest.mark.slow
async def test_timeouts_exhaust_the_bounded_retries(
        tmp_path: Path, certs: Pki, config_factory: Callable[..., Path], standin: StandinPlatform) -> None:
    async with lkm_registering(tmp_path, certs, config_factory, standin, timeout=0.3, max_attempts=2) as running:
        old = import_old_active(running)
        standin.stall_seconds = 30
        reply = await running.native("admin").request("POST", "/v1/keys/rotate")
        new_id = reply.body["id"]
        assert await eventually(lambda: len(events(running, "register_key")) == 2)
        await asyncio.sleep(0.3)  # no third attempt comes
        attempts = events(running, "register_key")
        assert [e["error_code"] for e in attempts] == ["platform_timeout", "platform_timeout"]
        assert [e["retrying"] for e in attempts] == [True, False]
        assert running.store.get_key(old.id).state is KeyState.ACTIVE
        assert running.store.get_key(new_id).state is KeyState.PENDING_ACTIVATION
        # Given up, the claim is released so that `lkm genesys register` may try again.
        assert "registration_lease" not in running.store.get_key(new_id).extra


@pytest.mark.slow
async def test_a_failed_test_decrypt_fails_the_registration(
        tmp_path: Path, certs: Pki, config_factory: Callable[..., Path], standin: StandinPlatform) -> None:
    async with lkm_registering(tmp_path, certs, config_factory, standin) as running:
        old = import_old_active(running)
        standin.connect(standin.lkm_decrypt_url, HawkCredential(id=running.hawk.id, key="not the key"))  # 401
        reply = await running.native("admin").request("POST", "/v1/keys/rotate")
        new_id = reply.body["id"]
        assert await eventually(lambda: events(running, "register_key"))
        [failure] = events(running, "register_key")
        assert failure["error_code"] == "platform_rejected" and "isn't ready" in failure["error_message"]
        assert standin.refused == ["test decrypt answered 401"] and not standin.registrations
        assert running.store.get_key(new_id).state is KeyState.PENDING_ACTIVATION
        assert running.store.get_key(old.id).state is KeyState.ACTIVE


async def lkm_cli(*args: str) -> tuple[int, str, str]:
    """The CLI's main on a thread of its own, while this event loop keeps serving lkm and the stand-in
    (tests/cli/test_main.py runs `lkm genesys register` as a child process)."""
    done = await asyncio.wait_for(asyncio.to_thread(lkm_here, *args, check=False), 120)
    return done.returncode, done.stdout, done.stderr


@pytest.mark.slow
async def test_cli_registers_by_hand_and_rotation_registers(
        tmp_path: Path, certs: Pki, config_factory: Callable[..., Path], standin: StandinPlatform) -> None:
    async with lkm_registering(tmp_path, certs, config_factory, standin) as running:
        config = str(running.config_path)
        standin.fail_next = [400]  # the platform refuses the first registration: the key stays pending
        status, out, err = await lkm_cli("keys", "create", "-c", config)
        assert status == 1 and "registration failed" in err and "stays pending_activation" in err
        key_id = err.split("new key ", 1)[1].split(":")[0]
        assert f"Retry with `lkm genesys register {key_id}`" in err
        status, out, err = await lkm_cli("genesys", "register", key_id, "-c", config)
        assert status == 0, err
        assert f"key {key_id} is active" in out
        status, out, err = await lkm_cli("keys", "rotate", "-c", config)
        assert status == 0, err
        assert "registering it with the platform" in err and "attempt 1: registered" in err
        running.store.refresh()
        states = {r.id: r.state for r in running.store.list_keys()}
        [rotated_id] = [i for i in states if i != key_id]
        assert states == {key_id: KeyState.RETIRED, rotated_id: KeyState.ACTIVE}
        assert [r.keypair_id for r in standin.registrations] == [key_id, rotated_id]
        cli_events = [e for e in events(running, "register_key") if e["actor"]["kind"] == "cli"]
        assert [(e["key_id"], e["outcome"]) for e in cli_events] == [
            (key_id, "error"), (key_id, "ok"), (rotated_id, "ok")]


@pytest.mark.slow
async def test_keys_left_pending_are_registered_at_start(
        tmp_path: Path, certs: Pki, config_factory: Callable[..., Path], standin: StandinPlatform) -> None:
    config = config_factory(genesys=standin.genesys_config(tmp_path / "client.secret"))
    settings = load_settings(config)
    assert settings.keystore.path is not None and settings.keystore.passphrase is not None
    store = FileKeyStore(settings.keystore.path, settings.keystore.passphrase.read_bytes())
    for index, (key_id, state) in enumerate(((OLD_ID, KeyState.ACTIVE), (PENDING_ID, KeyState.PENDING_ACTIVATION))):
        key = vector_key(index)
        store.import_key(key_id, key, state=state)
    store.close()
    async with start_server(tmp_path, certs, config) as running:
        standin.connect(running.url("platform") + "/key-management/v1/decrypt", running.hawk)
        assert await eventually(lambda: events(running, "activate_key"))
        assert running.store.get_key(PENDING_ID).state is KeyState.ACTIVE
        assert running.store.get_key(OLD_ID).state is KeyState.RETIRED
        assert [r.keypair_id for r in standin.registrations] == [PENDING_ID]
