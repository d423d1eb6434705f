"""The frozen callers in the PostgreSQL store's database: two servers on one throwaway database, `lkm freeze`
(the real CLI, another process as on another machine) stops a caller on both within refresh_seconds."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import pytest
import yaml

from lkm.freeze import FreezeMode, new_entry
from lkm.keystore.postgresql import PostgresKeyStore
from lkm.keystore.postgresql.frozen import ClusterFreezeList
from tests.conftest import TEST_SCRYPT_N, Pki, Running, base_config, start_server, wrap
from tests.lkmcli import lkm_here
from tests.pg import seed_pg_store

PASSPHRASE = "frozen horse battery staple"
REFRESH_SECONDS = 2.0


def replica_config(tmp: Path, certs: Pki, dsn: str) -> Path:
    tmp.mkdir()
    (tmp / "dsn").write_text(dsn + "\n")
    (tmp / "pass").write_text(PASSPHRASE + "\n")
    config = base_config(tmp, certs, **{
        "keystore": {"type": "postgresql", "dsn": {"file": str(tmp / "dsn")}, "passphrase": {"file": str(tmp / "pass")},
                     "pool_max": 3, "connect_timeout": 2},
        "limits.refresh_seconds": REFRESH_SECONDS,
    })
    path = tmp / "lkm.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


async def seconds_until(check: object, within: float) -> float:
    started = time.monotonic()
    while not await check():  # type: ignore[operator]
        assert time.monotonic() - started < within, f"not within {within} s"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


@pytest.mark.slow
async def test_a_freeze_reaches_every_server_on_the_database(tmp_path: Path, certs: Pki, pg_dsn: str) -> None:
    seed_pg_store(pg_dsn, PASSPHRASE)
    configs = [replica_config(tmp_path / f"replica{i}", certs, pg_dsn) for i in (1, 2)]
    async with contextlib.AsyncExitStack() as stack:
        servers: list[Running] = [await stack.enter_async_context(start_server(c.parent, certs, c)) for c in configs]
        record = servers[0].create_key()
        for running in servers:
            await running.server.refresh()
            store = running.server.store
            assert isinstance(store, PostgresKeyStore) and store._listener is not None
            assert await asyncio.to_thread(store._listener.connected.wait, 10)
            service = running.server.service
            assert service is not None and service.guard is not None
            assert isinstance(service.guard.frozen, ClusterFreezeList)

        async def statuses() -> list[int]:
            replies = [await r.native("unwrapper").request("GET", "/v1/keys") for r in servers]
            replies += [await r.platform().decrypt(record.id, wrap(record, b"q" * 32)) for r in servers]
            return [reply.status for reply in replies]
        assert await statuses() == [200] * 4

        # Frozen with the CLI of the first server's configuration: the second server's own file is untouched.
        await asyncio.to_thread(lkm_here, "-c", str(configs[0]), "freeze", "unwrapper", "--reason", "two replicas")
        await asyncio.to_thread(lkm_here, "-c", str(configs[0]), "freeze", "platform-test")
        frozen_at = time.monotonic()

        async def all_refused() -> bool:
            return await statuses() == [403] * 4
        await seconds_until(all_refused, within=REFRESH_SECONDS)
        print(f"frozen on both servers {time.monotonic() - frozen_at:.2f} s after the CLI returned")
        reply = await servers[1].native("unwrapper").request("GET", "/v1/keys")
        assert reply.body["error"]["code"] == "caller_frozen"
        assert not (configs[1].parent / "audit" / "frozen.json").exists()
        assert (await servers[1].native("admin").request("GET", "/v1/keys")).status == 200  # others go on

        listed = (await asyncio.to_thread(lkm_here, "-c", str(configs[1]), "freeze", "--list")).stdout
        assert "unwrapper\tstop\tby operator" in listed and "two replicas" in listed and "platform-test" in listed

        await asyncio.to_thread(lkm_here, "-c", str(configs[1]), "unfreeze", "unwrapper")
        await asyncio.to_thread(lkm_here, "-c", str(configs[1]), "unfreeze", "platform-test")

        async def all_served() -> bool:
            return await statuses() == [200] * 4
        await seconds_until(all_served, within=REFRESH_SECONDS)
        trail = [(e["action"], e["outcome"]) for e in servers[1].audit_lines()
                 if e["action"] in ("freeze_caller", "unfreeze_caller")]
        assert trail == [("unfreeze_caller", "intent"), ("unfreeze_caller", "ok")] * 2


def test_the_list_survives_a_reopen_and_a_repeated_freeze_changes_nothing(pg_dsn: str) -> None:
    store = PostgresKeyStore(pg_dsn, PASSPHRASE.encode(), listen=False, scrypt_n=TEST_SCRYPT_N)
    try:
        frozen = ClusterFreezeList(store)
        assert frozen.put(new_entry("caller-a", FreezeMode.STOP, "operator", "why"))
        assert not frozen.put(new_entry("caller-a", FreezeMode.STOP, "operator"))
        assert frozen.put(new_entry("caller-a", FreezeMode.SLOW, "breaker"))
        assert frozen.refresh() and not frozen.refresh() and frozen.poll() is False
        assert frozen.entries["caller-a"].mode is FreezeMode.SLOW and frozen.entries["caller-a"].by == "breaker"
    finally:
        store.close()
    reopened = PostgresKeyStore(pg_dsn, PASSPHRASE.encode(), listen=False)
    try:
        again = ClusterFreezeList(reopened)
        assert set(again.read()) == {"caller-a"}
        assert again.remove("caller-a") and not again.remove("caller-a") and again.read() == {}
    finally:
        reopened.close()
