"""`keystore.type: postgresql` end to end: the configuration, and a real server over real TLS on the store,
serving unwraps while the database is stopped and answering changes with 503 and Retry-After meanwhile."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from lkm.config import settings_from_mapping
from lkm.errors import ConfigError, KeyStoreError
from lkm.hawk import HawkCredential
from lkm.keys import KeyState
from lkm.keystore.open import open_keystore
from lkm.keystore.postgresql import PostgresKeyStore
from lkm.keystore.postgresql.schema import CODE_VERSION
from lkm.keystore.sealed import SCRYPT_N
from tests.conftest import Pki, b64, eventually, pooled_key, start_server, wrap
from tests.lkmcli import lkm_here
from tests.pg import PgCluster, seed_pg_store


def keystore_section(tmp_path: Path, dsn: str) -> dict[str, object]:
    (tmp_path / "keystore.dsn").write_text(dsn + "\n")
    (tmp_path / "pg.pass").write_text("correct horse battery staple\n")
    return {"type": "postgresql", "dsn": {"file": str(tmp_path / "keystore.dsn")},
            "passphrase": {"env": "LKM_TEST_PG_PASSPHRASE"}, "pool_min": 1, "pool_max": 3, "connect_timeout": 2}


def test_settings_open_the_store(tmp_path: Path, pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LKM_TEST_PG_PASSPHRASE", "correct horse battery staple")
    base = {"platform": {"insecure_plaintext": True, "hawk": {"credentials_file": str(tmp_path / "h.json")}},
            "native": {"enabled": False}}
    section = keystore_section(tmp_path, pg_dsn)
    settings = settings_from_mapping({**base, "keystore": section}, source="t.yaml", base_dir=tmp_path)
    assert settings.keystore.type == "postgresql" and settings.keystore.pool_max == 3
    store = open_keystore(settings.keystore)
    try:
        assert isinstance(store, PostgresKeyStore)
        record = store.create_key(state=KeyState.ACTIVE)
        assert store.get_key(record.id) == record
    finally:
        store.close()
    with psycopg.connect(pg_dsn, autocommit=True) as conn:  # a store made from settings: the production cost
        (header,) = conn.execute("SELECT value FROM lkm_meta WHERE name = 'kdf'").fetchone() or (None,)
    assert header["kdf"]["n"] == SCRYPT_N
    for bad, setting in (({"dsn": pg_dsn}, "keystore.dsn"), ({"pool_min": 4, "pool_max": 2}, "keystore.pool_max"),
                         ({"connect_timeout": 0}, "keystore.connect_timeout")):
        with pytest.raises(ConfigError) as caught:
            settings_from_mapping({**base, "keystore": {**section, **bad}}, source="t.yaml", base_dir=tmp_path)
        assert caught.value.setting == setting


@pytest.mark.slow
async def test_a_server_serves_through_a_database_outage(tmp_path: Path, certs: Pki, pg_dsn: str,
                                                         pg_cluster: PgCluster,
                                                         config_factory: Callable[..., Path],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LKM_TEST_PG_PASSPHRASE", "correct horse battery staple")
    seed_pg_store(pg_dsn, "correct horse battery staple")
    config = config_factory(keystore=keystore_section(tmp_path, pg_dsn))
    async with start_server(tmp_path, certs, config) as running:
        admin = running.native("admin")
        created = await admin.request("POST", "/v1/keys", {"label": "pg"})
        assert created.status in (200, 201), created.body
        record = running.server.store.get_key(created.body["id"])
        assert record.backend == "postgresql"
        pg_cluster.stop()
        try:
            for _ in range(5):
                secret = os.urandom(32)
                reply = await running.platform().decrypt(record.id, wrap(record, secret))
                assert reply.status == 200 and reply.body["body"] == b64(secret), reply.body
            # Still ready (playback goes on), but the store says it is degraded.
            await eventually(lambda: running.server.store.health().status == "degraded", within=10)
            await running.server.update_readiness()  # the periodic check, without waiting for its tick
            async with running.session.get(running.url("ops") + "/readyz") as ready:
                body = await ready.json()
            assert ready.status == 200 and body["ready"], body
            assert body["checks"]["keystore"]["detail"].startswith("postgresql degraded"), body
            refused = await admin.request("POST", "/v1/keys", {"label": "during the outage"})
            assert refused.status == 503 and refused.body["error"]["code"] == "keystore_unavailable"
            assert refused.headers["Retry-After"].isdigit()
        finally:
            pg_cluster.start()

        # Changes resume by themselves once the database is back (the pool reconnects; nothing is restarted).
        deadline = time.monotonic() + 20
        while (reply := await admin.request("POST", "/v1/keys", {"label": "after"})).status not in (200, 201):
            assert reply.status == 503 and time.monotonic() < deadline, reply.body
            await asyncio.sleep(0.2)
        assert running.server.store.get_key(reply.body["id"]).label == "after"
        # Both keys, whole: times are kept to the second, so two keys made within one are listed by id.
        assert sorted(k.label for k in running.server.store.list_keys()) == ["after", "pg"]


@pytest.mark.slow
async def test_hawk_changes_reach_a_running_server_through_the_notification(
        tmp_path: Path, certs: Pki, pg_dsn: str, config_factory: Callable[..., Path],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`lkm hawk create/list/revoke` on the database (another process, as on another machine): the server
    accepts and then refuses the credential within a second, long before its refresh tick."""
    monkeypatch.setenv("LKM_TEST_PG_PASSPHRASE", "correct horse battery staple")
    seed_pg_store(pg_dsn, "correct horse battery staple")
    config = config_factory(keystore=keystore_section(tmp_path, pg_dsn), **{"limits.refresh_seconds": 60.0})
    async with start_server(tmp_path, certs, config) as running:
        store = running.server.store
        assert isinstance(store, PostgresKeyStore) and store._listener is not None
        assert await asyncio.to_thread(store._listener.connected.wait, 10)  # LISTEN in force before the change
        record = pooled_key(store, KeyState.ACTIVE)
        made = json.loads((await asyncio.to_thread(lkm_here, "hawk", "create", "replica-shared", "--json",
                                                   "-c", str(config))).stdout)
        created_at = time.monotonic()
        credential = HawkCredential(made["id"], made["key"])

        async def accepted() -> bool:
            secret = os.urandom(32)
            reply = await running.platform(credential).decrypt(record.id, wrap(record, secret))
            return reply.status == 200
        while not await accepted():
            assert time.monotonic() - created_at < 1.0, "credential not accepted within 1 s"
            await asyncio.sleep(0.02)

        listed = (await asyncio.to_thread(lkm_here, "hawk", "list", "-c", str(config))).stdout
        assert "replica-shared (database, created " in listed and made["key"] not in listed
        await asyncio.to_thread(lkm_here, "hawk", "revoke", "replica-shared", "-c", str(config))
        revoked_at = time.monotonic()
        assert await eventually(lambda: running.server.hawk_source is not None
                                and running.server.hawk_source.get("replica-shared") is None, within=1.0)
        assert time.monotonic() - revoked_at < 1.0
        assert not await accepted()
        assert "replica-shared" not in (await asyncio.to_thread(lkm_here, "hawk", "list", "-c", str(config))).stdout
        again = await asyncio.to_thread(lkm_here, "hawk", "revoke", "replica-shared", "-c", str(config), check=False)
        assert again.returncode != 0 and "no Hawk credential 'replica-shared'" in again.stderr


@pytest.mark.slow
def test_check_config_refuses_a_newer_schema(tmp_path: Path, pg_dsn: str, config_factory: Callable[..., Path],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LKM_TEST_PG_PASSPHRASE", "correct horse battery staple")
    seed_pg_store(pg_dsn, "correct horse battery staple")  # schema at CODE_VERSION
    config = config_factory(keystore=keystore_section(tmp_path, pg_dsn))
    assert lkm_here("check-config", "-c", str(config)).returncode == 0
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("UPDATE lkm_schema_version SET version = %s", (CODE_VERSION + 1,))
    refused = lkm_here("check-config", "-c", str(config), check=False)
    assert refused.returncode != 0
    assert f"schema is version {CODE_VERSION + 1}, newer than this lkm" in refused.stderr + refused.stdout
    with pytest.raises(KeyStoreError, match="newer than this lkm understands"):
        PostgresKeyStore(pg_dsn, b"correct horse battery staple", listen=False)
