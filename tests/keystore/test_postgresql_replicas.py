"""Three `lkm serve` processes on one PostgreSQL database, driven over real TLS as a load balancer would:
a key created on one is served by all, a key disabled with the CLI is refused by all, the scheduled rotation
happens once, a replayed Hawk request is refused by every replica (replay_check: cluster), and the database
stopped and started under load costs no unwrap of a known key. The measured figures are printed."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from lkm.client import NativeClient, client_ssl_context
from lkm.hawk import HawkCredential, sign_request
from lkm.keys import Algorithm, KeyRecord, KeyState, format_time, new_key_id, utcnow
from lkm.keystore.postgresql import PostgresKeyStore
from lkm.lifecycle_safeguards import DESTRUCTION_SCHEDULED_AT, DISABLED_AT
from tests.conftest import KEY_POOL, TEST_SCRYPT_N, Pki, b64, base_config, wrap
from tests.lkmcli import lkm, lkm_here
from tests.pg import PgCluster
from tests.standin_platform import StandinPlatform

PASSPHRASE = "replica horse battery staple"
PUBLIC_HOST, PUBLIC_PORT = "lkm.example", 443  # what the platform signs: the load balancer's name
DECRYPT_PATH = "/key-management/v1/decrypt"


CLUSTER_SETTINGS: dict[str, Any] = {
    "platform.public_host": PUBLIC_HOST, "platform.public_port": PUBLIC_PORT,
    "platform.hawk": {"replay_check": "cluster"},
    "rotation": {"every": "1h"},
    "limits.refresh_seconds": 2.0,  # the bound a lost notification falls back on; notifications are faster
}


def replica_config(tmp: Path, certs: Pki, dsn_file: Path, index: int,
                   settings: dict[str, Any] | None = None) -> Path:
    """Replica `index`'s config on the shared database, with `settings` (default: CLUSTER_SETTINGS)."""
    directory = tmp / f"replica{index}"
    directory.mkdir()
    (directory / "pass").write_text(PASSPHRASE + "\n")
    config = base_config(directory, certs, **{
        "keystore": {"type": "postgresql", "dsn": {"file": str(dsn_file)},
                     "passphrase": {"file": str(directory / "pass")}, "pool_max": 3, "connect_timeout": 2},
        **(CLUSTER_SETTINGS if settings is None else settings),
    })
    path = directory / "lkm.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class Replica:
    def __init__(self, config: Path) -> None:
        self.config = config
        self.proc = subprocess.Popen([sys.executable, "-m", "lkm", "serve", "-c", str(config)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("lkm serving: "):
            raise AssertionError(f"replica did not start: {line}{self.proc.stderr.read() if self.proc.stderr else ''}")
        self.urls = dict(part.split(" ", 1) for part in line.removeprefix("lkm serving: ").strip().split(", "))

    def audit(self) -> list[dict[str, Any]]:
        path = self.config.parent / "audit" / "audit.log"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.communicate()


class Platform:
    """Signs as the platform does, for the load balancer's name, and can send one signed request anywhere."""

    def __init__(self, session: aiohttp.ClientSession, credential: HawkCredential, certs: Pki) -> None:
        self.session = session
        self.credential = credential
        self.ssl = client_ssl_context(certs.ca_file)

    def signed(self, key_id: str, wrapped: bytes) -> tuple[bytes, dict[str, str]]:
        body = json.dumps({"keypairId": key_id, "body": b64(wrapped)}).encode()
        auth = sign_request(self.credential, method="POST", resource=DECRYPT_PATH, host=PUBLIC_HOST,
                            port=PUBLIC_PORT, content_type="application/json", body=body)
        return body, {"Content-Type": "application/json", "Authorization": auth}

    async def send(self, replica: Replica, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
        async with self.session.post(replica.urls["platform"] + DECRYPT_PATH, data=body, headers=headers,
                                     ssl=self.ssl) as resp:
            return resp.status, await resp.json(content_type=None)

    async def decrypt(self, replica: Replica, key_id: str, wrapped: bytes) -> tuple[int, dict[str, Any]]:
        return await self.send(replica, *self.signed(key_id, wrapped))


async def until(check: Any, within: float) -> float:
    """Seconds until the async `check` holds; fails after `within`."""
    started = time.monotonic()
    while not await check():
        assert time.monotonic() - started < within, f"not within {within} s"
        await asyncio.sleep(0.01)
    return time.monotonic() - started


@pytest.mark.slow
@pytest.mark.long(13)
async def test_three_replicas_on_one_database(tmp_path: Path, certs: Pki, pg_dsn: str, pg_cluster: PgCluster) -> None:
    dsn_file = tmp_path / "keystore.dsn"
    dsn_file.write_text(pg_dsn + "\n")
    configs = [replica_config(tmp_path, certs, dsn_file, i) for i in range(3)]
    figures: dict[str, Any] = {}

    # An active key older than the rotation period: every replica finds the rotation due when it starts.
    seed = PostgresKeyStore(pg_dsn, PASSPHRASE.encode(), listen=False, scrypt_n=TEST_SCRYPT_N)
    try:
        old = seed.import_key(new_key_id(), KEY_POOL.take(), state=KeyState.ACTIVE, label="overdue")
        seed.save_record(old.with_changes(created=utcnow() - timedelta(hours=2)))
    finally:
        seed.close()
    created = json.loads(lkm_here("hawk", "create", "platform", "--json", "-c", str(configs[0])).stdout)
    credential = HawkCredential(created["id"], created["key"])

    replicas: list[Replica] = []
    try:
        replicas = [Replica(config) for config in configs]
        async with aiohttp.ClientSession() as session:
            platform = Platform(session, credential, certs)
            cert, key = certs.client("admin")
            admins = [NativeClient(session, r.urls["native"], client_ssl_context(certs.ca_file, cert, key))
                      for r in replicas]

            # Rotation: exactly once across the three, whichever got the lock first.
            async def rotated() -> bool:
                states = [k["state"] for k in (await admins[2].request("GET", "/v1/keys")).body["keys"]]
                return sorted(states) == ["active", "retired"]
            await until(rotated, 20)
            await asyncio.sleep(2.5)  # more looks at the schedule by every replica (each refresh tick)
            assert await rotated()
            rotations = [e for r in replicas for e in r.audit() if e.get("action") == "rotate_key"]
            # A replica that announced the rotation and then found it made records that nothing changed.
            assert len([e for e in rotations if e.get("outcome") == "ok" and not e.get("unchanged")]) == 1, rotations
            figures["rotations"] = len(rotations)

            # A key created on replica 0 is served by replicas 1 and 2.
            reply = await admins[0].request("POST", "/v1/keys", {"label": "made on replica 0"})
            assert reply.status in (200, 201), reply.body
            made = await asyncio.to_thread(_record, pg_dsn, reply.body["id"])
            secret = os.urandom(32)

            def served_by(replica: Replica) -> Any:
                async def check() -> bool:
                    status, body = await platform.decrypt(replica, made.id, wrap(made, secret))
                    return status == 200 and body["body"] == b64(secret)
                return check
            figures["create_seen_s"] = max([await until(served_by(r), 1.0) for r in replicas[1:]])

            # Disabled with the CLI (another process, as on another machine): refused by all within 1 s.
            lkm("keys", "disable", made.id, "-c", str(configs[1]))
            disabled_at = time.monotonic()

            def refused_by(replica: Replica) -> Any:
                async def check() -> bool:
                    status, _ = await platform.decrypt(replica, made.id, wrap(made, secret))
                    return status != 200
                return check
            for replica in replicas:
                await until(refused_by(replica), 1.0)
            figures["disable_seen_s"] = time.monotonic() - disabled_at

            # One signed request, replayed to the other replicas: refused by each (replay_check: cluster).
            active = await asyncio.to_thread(_active, pg_dsn)
            body, headers = platform.signed(active.id, wrap(active, secret))
            statuses = [(await platform.send(r, body, headers))[0] for r in replicas]
            assert statuses == [200, 401, 401], statuses
            figures["replay_statuses"] = statuses

            # The database stopped and started under load: no unwrap of a known key fails.
            counts = {"ok": 0, "failed": 0}
            stop = asyncio.Event()

            async def load(replica: Replica) -> None:
                while not stop.is_set():
                    value = os.urandom(32)
                    status, answer = await platform.decrypt(replica, active.id, wrap(active, value))
                    counts["ok" if status == 200 and answer.get("body") == b64(value) else "failed"] += 1
                    await asyncio.sleep(0.05)  # steady traffic through the outage, not a saturated CPU
            workers = [asyncio.create_task(load(r)) for r in replicas for _ in range(2)]
            await asyncio.sleep(1)
            await asyncio.to_thread(pg_cluster.stop)
            stopped_at = time.monotonic()
            try:
                await asyncio.sleep(3)
                during = dict(counts)
                refused = await admins[2].request("POST", "/v1/keys", {"label": "while the database is away"})
                assert refused.status == 503 and "Retry-After" in refused.headers, refused.body
            finally:
                await asyncio.to_thread(pg_cluster.start)
            figures["outage_s"] = round(time.monotonic() - stopped_at, 1)

            async def change_goes_through() -> bool:
                reply = await admins[2].request("POST", "/v1/keys", {"label": "after the outage"})
                return reply.status in (200, 201)
            figures["resume_s"] = round(await until(change_goes_through, 30), 2)
            stop.set()
            await asyncio.gather(*workers)
            figures["unwraps_ok"], figures["unwraps_failed"] = counts["ok"], counts["failed"]
            figures["unwraps_during_outage"] = during["ok"]
            assert counts["failed"] == 0 and during["ok"] > 0, counts
        assert all(r.proc.poll() is None for r in replicas)
    finally:
        for replica in replicas:
            replica.stop()
        print("\nthree-replica figures:", json.dumps(figures))


def _record(dsn: str, key_id: str) -> Any:
    store = PostgresKeyStore(dsn, PASSPHRASE.encode(), listen=False)
    try:
        return store.get_key(key_id)
    finally:
        store.close()


def _active(dsn: str) -> Any:
    store = PostgresKeyStore(dsn, PASSPHRASE.encode(), listen=False)
    try:
        (record,) = [k for k in store.list_keys() if k.state is KeyState.ACTIVE]
        return record
    finally:
        store.close()


# --- destruction safeguards across machines ----------------------------------------------------------------

def _due_for_destruction(store: PostgresKeyStore) -> KeyRecord:
    """A key whose scheduled waiting period has passed: `lkm keys destroy` may erase it now."""
    now = utcnow()
    record = store.import_key(new_key_id(), KEY_POOL.take(), state=KeyState.DISABLED, label="doomed")
    return store.save_record(record.with_changes(
        state=KeyState.PENDING_DESTRUCTION, destroy_after=now - timedelta(days=1),
        extra={**record.extra, DISABLED_AT: format_time(now - timedelta(days=12)),
               DESTRUCTION_SCHEDULED_AT: format_time(now - timedelta(days=11))}))


def _cli(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "lkm", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _finish(proc: subprocess.Popen[str]) -> tuple[int, str]:
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out + err


@pytest.mark.long(5)
@pytest.mark.slow
def test_two_machines_destroy_concurrently(tmp_path: Path, certs: Pki, pg_dsn: str) -> None:
    """Two `lkm keys destroy` on two "machines" (own configuration, one database): exactly one erases the key,
    the other is refused with a clear message; and `cancel-destruction` + `enable` racing `destroy` never leave
    an enabled key without its private half."""
    dsn_file = tmp_path / "keystore.dsn"
    dsn_file.write_text(pg_dsn + "\n")
    machines = [replica_config(tmp_path, certs, dsn_file, i) for i in range(2)]
    store = PostgresKeyStore(pg_dsn, PASSPHRASE.encode(), listen=False, scrypt_n=TEST_SCRYPT_N)
    try:
        doomed = _due_for_destruction(store)
        racers = [_cli("keys", "destroy", doomed.id, "-c", str(config)) for config in machines]
        results = [_finish(proc) for proc in racers]
        assert sorted(code for code, _ in results) == [0, 1], results
        (refusal,) = [text for code, text in results if code != 0]
        assert "cannot go from destroyed to destroyed" in refusal and "Traceback" not in refusal, refusal
        store.refresh()
        assert store.get_key(doomed.id).state is KeyState.DESTROYED
        erasures = [e for config in machines for e in _audit(config)
                    if e.get("action") == "destroy_key" and e.get("outcome") != "intent"]
        assert sorted(e["outcome"] for e in erasures) == ["error", "ok"], erasures

        outcomes = []
        for _ in range(3):
            key = _due_for_destruction(store)
            saver = _cli("keys", "cancel-destruction", key.id, "-c", str(machines[0]))
            destroyer = _cli("keys", "destroy", key.id, "-c", str(machines[1]))
            cancelled, _ = _finish(saver)
            enabled = _finish(_cli("keys", "enable", key.id, "-c", str(machines[0])))[0] if cancelled == 0 else 1
            destroyed, _ = _finish(destroyer)
            assert (cancelled == 0) != (destroyed == 0), (cancelled, destroyed)  # one decision wins, never both
            store.refresh()
            final = store.get_key(key.id)
            if destroyed == 0:
                assert final.state is KeyState.DESTROYED and enabled != 0
            else:
                assert enabled == 0 and final.state is KeyState.RETIRED
                secret = os.urandom(32)
                assert store.decrypt(key.id, wrap(final, secret), Algorithm.RSA_OAEP_SHA1) == secret
            outcomes.append(final.state.value)
        print("\nenable/destroy races ended:", outcomes)
    finally:
        store.close()


def _audit(config: Path) -> list[dict[str, Any]]:
    path = config.parent / "audit" / "audit.log"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


# --- registration with the platform, once across replicas ------------------------------------------------------

@pytest.mark.slow
@pytest.mark.long(7)
async def test_registration_runs_once_across_replicas(tmp_path: Path, certs: Pki, pg_dsn: str) -> None:
    """Three replicas start together with keys pending activation and an overdue active key (so the scheduled
    rotation makes one more): the stand-in platform sees exactly one registration call per key."""
    standin = StandinPlatform(certs.ca_file)
    await standin.start()
    dsn_file = tmp_path / "keystore.dsn"
    dsn_file.write_text(pg_dsn + "\n")
    configs = [replica_config(tmp_path, certs, dsn_file, index, {
        "genesys": standin.genesys_config(tmp_path / f"client{index}.secret"),
        "rotation": {"every": "1h"}, "limits.refresh_seconds": 1.0}) for index in range(3)]
    seed = PostgresKeyStore(pg_dsn, PASSPHRASE.encode(), listen=False, scrypt_n=TEST_SCRYPT_N)
    try:
        old = seed.import_key(new_key_id(), KEY_POOL.take(), state=KeyState.ACTIVE, label="overdue")
        seed.save_record(old.with_changes(created=utcnow() - timedelta(hours=2), registered=utcnow()))
        pending = [seed.import_key(new_key_id(), KEY_POOL.take(), state=KeyState.PENDING_ACTIVATION,
                                   label=f"pending {i}").id for i in range(2)]
    finally:
        seed.close()
    created = json.loads(lkm_here("hawk", "create", "platform", "--json", "-c", str(configs[0])).stdout)
    replicas: list[Replica] = []
    try:
        replicas = list(await asyncio.gather(*(asyncio.to_thread(Replica, config) for config in configs)))
        standin.connect(replicas[0].urls["platform"] + DECRYPT_PATH, HawkCredential(created["id"], created["key"]))

        def unregistered() -> list[str]:
            store = PostgresKeyStore(pg_dsn, PASSPHRASE.encode(), listen=False)
            try:
                return [k.id for k in store.list_keys() if k.registered is None]
            finally:
                store.close()

        async def all_registered() -> bool:
            return not await asyncio.to_thread(unregistered)
        await until(all_registered, 30)
        await asyncio.sleep(2.5)  # more refresh and schedule ticks on every replica: nothing is registered twice
        registered = [r.keypair_id for r in standin.registrations]
        assert set(pending) <= set(registered), registered
        assert len(registered) == len(set(registered)) == standin.calls, (registered, standin.calls)
        assert not await asyncio.to_thread(unregistered)
        attempts = [e for r in replicas for e in r.audit() if e.get("action") == "register_key"]
        assert sorted(e["key_id"] for e in attempts if e.get("outcome") == "ok") == sorted(registered), attempts
        print("\nregistration calls per key:", {k: registered.count(k) for k in registered},
              "by replica:", [sum(e.get("outcome") == "ok" for e in r.audit() if e.get("action") == "register_key")
                              for r in replicas])
    finally:
        for replica in replicas:
            await asyncio.to_thread(replica.stop)
        await standin.stop()
