"""The PostgreSQL key store beyond the common contract: sealing, schema versions, replicas seeing each other's
changes, the cross-replica lock, serving through a database outage, and the Hawk tables. Always against a real
PostgreSQL server (tests/pg.py), never a stand-in.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import psycopg
import pytest
from cryptography.hazmat.primitives import serialization
from psycopg.types.json import Jsonb

from lkm.errors import IllegalTransition, KeyStoreError
from lkm.keys import PADDINGS, Algorithm, KeyRecord, KeyState, record_to_doc
from lkm.keystore.health import ReportsHealth, StoreStatus
from lkm.keystore.postgresql import PostgresKeyStore
from lkm.keystore.postgresql.hawk import ClusterHawk
from lkm.keystore.postgresql.schema import CODE_VERSION, schema_version
from tests.conftest import TEST_SCRYPT_N, pooled_key, vector_key
from tests.pg import PgCluster

PASSPHRASE = b"correct horse battery staple"


@pytest.fixture
def open_store(pg_dsn: str) -> Iterator[Callable[..., PostgresKeyStore]]:
    """Opens stores on this test's database (another server, the CLI) and closes them all at the end."""
    opened: list[PostgresKeyStore] = []

    def opener(**options: object) -> PostgresKeyStore:
        store = PostgresKeyStore(pg_dsn, PASSPHRASE, **{"scrypt_n": TEST_SCRYPT_N, **options})  # type: ignore[arg-type]
        opened.append(store)
        return store

    yield opener
    for store in opened:
        store.close()


def imported(store: PostgresKeyStore, state: KeyState = KeyState.ACTIVE) -> KeyRecord:
    return store.import_key(str(uuid.uuid4()), vector_key("oaep-sha1"), state=state)


def unwrap_works(store: PostgresKeyStore, record: KeyRecord) -> bool:
    secret = os.urandom(32)
    ciphertext = record.public_key.encrypt(secret, PADDINGS[Algorithm.RSA_OAEP_SHA1])
    return store.decrypt(record.id, ciphertext, Algorithm.RSA_OAEP_SHA1) == secret


def wait_for(condition: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def wait_listening(store: PostgresKeyStore) -> None:
    listener = store._listener  # the test waits until LISTEN is in force before writing
    assert listener is not None and listener.connected.wait(10)


# --- sealing ------------------------------------------------------------------------------------------------

def test_the_database_holds_no_private_key_bytes(open_store: Callable[..., PostgresKeyStore], pg_dsn: str) -> None:
    store = open_store()
    record = imported(store)
    private = vector_key("oaep-sha1")
    der = private.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    prime = private.private_numbers().p.to_bytes(192, "big")
    with psycopg.connect(pg_dsn) as conn:
        rows = conn.execute("SELECT id, doc::text, private_key FROM lkm_keys").fetchall()
        dump = b"".join(str(r[0]).encode() + r[1].encode() + bytes(r[2]) for r in rows)
        assert rows and record.id.encode() in dump  # the dump is real: it holds the key's row
        assert der not in dump and prime not in dump and prime[:32] not in dump
        # The sealed blob is bound to its id: moved under another key's id, it does not open.
        other = imported(store)
        conn.execute("UPDATE lkm_keys SET private_key = (SELECT private_key FROM lkm_keys WHERE id = %s) "
                     "WHERE id = %s", (record.id, other.id))
    moved = open_store()
    with pytest.raises(KeyStoreError, match="does not open"):
        unwrap_works(moved, other)
    assert unwrap_works(moved, record)


def test_wrong_passphrase_is_refused(open_store: Callable[..., PostgresKeyStore], pg_dsn: str) -> None:
    imported(open_store())
    with pytest.raises(KeyStoreError, match="wrong passphrase") as caught:
        PostgresKeyStore(pg_dsn, b"another passphrase")
    assert caught.value.transient is False


# --- schema -------------------------------------------------------------------------------------------------

def test_schema_is_created_once_and_a_newer_one_refused(open_store: Callable[..., PostgresKeyStore],
                                                        pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn) as conn:
        assert schema_version(conn) == 0
    first = open_store()
    imported(first)
    second = open_store()  # a second replica finds the schema in place and keeps the keys
    assert [r.id for r in second.list_keys()] == [r.id for r in first.list_keys()]
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        assert schema_version(conn) == CODE_VERSION
        conn.execute("UPDATE lkm_schema_version SET version = %s", (CODE_VERSION + 1,))
    with pytest.raises(KeyStoreError) as caught:
        PostgresKeyStore(pg_dsn, PASSPHRASE)
    message = str(caught.value)
    assert f"version {CODE_VERSION + 1}" in message and f"version {CODE_VERSION})" in message
    assert caught.value.transient is False


# --- replicas -----------------------------------------------------------------------------------------------

def test_a_change_reaches_another_replica_within_a_second(open_store: Callable[..., PostgresKeyStore]) -> None:
    writer, reader = open_store(), open_store()
    wait_listening(reader)
    record = pooled_key(writer, KeyState.ACTIVE, "made on one replica")
    # No refresh() and no get_key() on the reader: only the notification can bring the key.
    assert wait_for(lambda: any(r.id == record.id for r in reader.list_keys()), 1.0)
    assert unwrap_works(reader, record)
    writer.save_record(record.with_changes(state=KeyState.DISABLED))
    assert wait_for(lambda: reader.list_keys() and reader.get_key(record.id).state is KeyState.DISABLED, 1.0)


def test_refresh_heals_a_lost_notification(open_store: Callable[..., PostgresKeyStore], pg_dsn: str) -> None:
    writer, reader = open_store(), open_store()
    wait_listening(reader)
    record = imported(writer)
    assert wait_for(lambda: any(r.id == record.id for r in reader.list_keys()), 1.0)
    # A change whose notification never arrives (written without NOTIFY, as if the listener had been cut off).
    retired = record.with_changes(state=KeyState.RETIRED)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("UPDATE lkm_keys SET doc = %s, change = nextval('lkm_change_seq') WHERE id = %s",
                     (Jsonb(record_to_doc(retired)), record.id))
    time.sleep(1.0)
    assert reader.get_key(record.id).state is KeyState.ACTIVE  # nothing told the reader
    assert reader.refresh() is True
    assert reader.get_key(record.id).state is KeyState.RETIRED
    assert reader.refresh() is False


def test_the_lock_excludes_another_replica(open_store: Callable[..., PostgresKeyStore]) -> None:
    first, second = open_store(), open_store()
    entered = threading.Event()

    def take() -> None:
        with second.lock():
            entered.set()

    with first.lock(), first.lock():  # re-entrant in one thread
        thread = threading.Thread(target=take)
        thread.start()
        assert not entered.wait(1.0)  # the other replica waits while the section is held
    assert entered.wait(10)
    thread.join()


def test_destruction_is_judged_on_the_database_not_a_stale_view(
        open_store: Callable[..., PostgresKeyStore]) -> None:
    stale, fresh = open_store(listen=False), open_store(listen=False)
    record = imported(stale)
    stale.save_record(record.with_changes(state=KeyState.PENDING_DESTRUCTION))
    fresh.refresh()
    fresh.save_record(fresh.get_key(record.id).with_changes(state=KeyState.ACTIVE))  # re-enabled elsewhere
    assert stale.get_key(record.id).state is KeyState.PENDING_DESTRUCTION  # this view is out of date
    with pytest.raises(IllegalTransition):
        stale.destroy_private(record.id)
    assert unwrap_works(fresh, record) and unwrap_works(stale, record)


# --- the database going away --------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.long(8)
def test_unwraps_go_on_while_the_database_is_down(open_store: Callable[..., PostgresKeyStore],
                                                  pg_cluster: PgCluster) -> None:
    store = open_store(connect_timeout=2)
    used, unused = imported(store), imported(store)
    other = open_store(connect_timeout=2, listen=False)  # a key this replica has loaded but never opened
    assert isinstance(other, ReportsHealth) and other.health().status is StoreStatus.OK
    assert unwrap_works(store, used)
    pg_cluster.stop()
    try:
        assert wait_for(lambda: store.health().status is StoreStatus.DEGRADED, 10)
        assert "OperationalError" in store.health().detail
        store.check()  # still ready: it serves
        assert unwrap_works(store, used) and unwrap_works(store, unused)
        with pytest.raises(KeyStoreError) as caught:
            store.save_record(used.with_changes(state=KeyState.RETIRED))
        assert caught.value.transient is True
        with pytest.raises(KeyStoreError):
            other.refresh()
        assert other.health().status is StoreStatus.DEGRADED
        assert unwrap_works(other, unused)
        assert store.get_key(used.id).state is KeyState.ACTIVE
    finally:
        pg_cluster.start()
    assert wait_for(lambda: store.health().status is StoreStatus.OK, 15)
    retired = store.save_record(used.with_changes(state=KeyState.RETIRED))
    assert other.refresh() is True and other.get_key(used.id) == retired
    assert other.health().status is StoreStatus.OK


# --- Hawk ---------------------------------------------------------------------------------------------------

def test_hawk_credentials_are_shared_and_sealed(open_store: Callable[..., PostgresKeyStore], pg_dsn: str) -> None:
    one, two = ClusterHawk(open_store(), window_seconds=60), ClusterHawk(open_store(), window_seconds=60)
    credential = one.create("platform-1")
    with pytest.raises(ValueError, match="already exists"):
        two.create("platform-1")
    with pytest.raises(ValueError, match="expected 1-64"):
        one.create("no spaces")
    assert two.load() == {"platform-1": credential}
    assert [c.id for c in two.list()] == ["platform-1"]
    with psycopg.connect(pg_dsn) as conn:
        raw = b"".join(bytes(r[0]) for r in conn.execute("SELECT key_sealed FROM lkm_hawk_credentials"))
    assert credential.key.encode() not in raw
    assert two.revoke("platform-1") is True and two.revoke("platform-1") is False
    assert one.load() == {}


def test_a_nonce_is_refused_by_every_replica(open_store: Callable[..., PostgresKeyStore]) -> None:
    one, two = ClusterHawk(open_store(), window_seconds=60), ClusterHawk(open_store(), window_seconds=60)
    now = time.time()
    ts = int(now)
    assert one.check_and_remember("platform-1", "n1", ts, now) is True
    assert two.check_and_remember("platform-1", "n1", ts, now) is False
    assert one.check_and_remember("platform-1", "n1", ts, now) is False
    assert two.check_and_remember("platform-2", "n1", ts, now) is True  # another caller's nonce
    assert two.check_and_remember("platform-1", "n1", ts + 1, now) is True
    later = now + 120  # the window has passed: the entry may be taken again, and expired ones are purged
    assert one.check_and_remember("platform-1", "n1", ts, later) is True
    assert two.check_and_remember("platform-1", "n2", int(later), later) is True
    assert two.purge(later) == 0  # the purge that came with the call above left only live entries
    assert two.purge(later + 120) == 1
