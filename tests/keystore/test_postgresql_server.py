"""`keystore.type: postgresql` end to end: the configuration, and a real server over real TLS on the store,
serving unwraps while the database is stopped and answering changes with 503 and Retry-After meanwhile."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from lkm.config import settings_from_mapping
from lkm.errors import ConfigError
from lkm.keys import KeyState
from lkm.keystore.open import open_keystore
from lkm.keystore.postgresql import PostgresKeyStore
from tests.conftest import Pki, b64, eventually, start_server, wrap
from tests.pg import PgCluster


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
        assert [k.label for k in running.server.store.list_keys()] == ["pg", "after"]
