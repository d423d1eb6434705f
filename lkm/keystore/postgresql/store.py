"""PostgresKeyStore: the key-store contract over a PostgreSQL database shared by every replica.

See the package docstring for the design; this module keeps the cache, reads and writes.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import psycopg
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool, PoolTimeout

from lkm.errors import KeyNotFound, KeyStoreError
from lkm.keys import (
    DESTRUCTION_RULE,
    KeyRecord,
    KeyState,
    check_transition,
    parse_key_id,
    record_from_doc,
    record_to_doc,
    utcnow,
)
from lkm.keystore import check_record_only, same_key, sealed
from lkm.keystore.health import StoreHealth, StoreStatus
from lkm.keystore.inprocess import InProcessKeyStore, reentrant
from lkm.keystore.postgresql.listener import Listener, describe
from lkm.keystore.postgresql.schema import CHANNEL, LOCK_CLASS, STORE_LOCK, WRITE_LOCK, migrate
from lkm.sealing import open_bytes, seal_bytes

log = logging.getLogger("lkm.keystore.postgresql")

HEADER_FORMAT = "lkm-postgresql-keystore"
_SELECT_ONE = "SELECT id, doc, private_key, change FROM lkm_keys WHERE id = %s"

@dataclass(frozen=True)
class _Row:
    record: KeyRecord
    sealed: bytes | None  # nonce || AES-GCM(PKCS#8 DER); None once destroyed
    change: int


class PostgresKeyStore(InProcessKeyStore):
    backend = "postgresql"

    def __init__(self, dsn: str, passphrase: bytes, *, pool_min: int = 1, pool_max: int = 4,
                 connect_timeout: float = 5.0, listen: bool = True, scrypt_n: int = sealed.SCRYPT_N) -> None:
        """Connects, migrates the schema, derives the master key and loads every key; raises KeyStoreError.
        `scrypt_n` is the scrypt cost written into the header of a NEW store, as for the file store (a database
        that has its header keeps the cost recorded there)."""
        self._dsn = dsn
        self._connect_timeout = connect_timeout
        self._conn_kwargs: dict[str, Any] = {
            "autocommit": True, "connect_timeout": max(1, round(connect_timeout)),
            # A dead server or a cut network shows within seconds, not after the kernel's two hours.
            "keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2, "keepalives_count": 2,
            "application_name": "lkm",
        }
        self._records: dict[str, KeyRecord] = {}
        self._sealed: dict[str, bytes | None] = {}
        self._changes: dict[str, int] = {}
        self._private: dict[str, rsa.RSAPrivateKey] = {}
        self._seen = 0  # highest change number loaded by a refresh
        self._lock = threading.Lock()
        self._refresh_lock = threading.Lock()
        self._held = threading.local()
        self._health = StoreHealth(StoreStatus.OK, since=time.time())
        self._pool = ConnectionPool(dsn, min_size=pool_min, max_size=pool_max, kwargs=self._conn_kwargs,
                                    timeout=connect_timeout, open=False, name="lkm-keystore",
                                    check=ConnectionPool.check_connection)
        self._listener: Listener | None = None
        self._subscribers: list[Callable[[frozenset[str] | None], None]] = []
        try:
            self._pool.open(wait=True, timeout=connect_timeout)
            with self.connection() as conn:
                migrate(conn)
                master = sealed.master_key(self._header(conn, passphrase, scrypt_n), HEADER_FORMAT, passphrase,
                                           "in the PostgreSQL database")
                self._aead = AESGCM(master)
                self._rejection_secret = sealed.rejection_secret(master)
            self.refresh()
        except BaseException:
            self._pool.close()
            raise
        if listen:
            self._listener = Listener(self.connect, CHANNEL, on_change=self._heard,
                                      on_down=self._mark_degraded, on_up=self._mark_ok)

    # --- connections ---------------------------------------------------------------------------------------

    def connect(self) -> psycopg.Connection[Any]:
        """A connection of its own (not from the pool), for a session that outlives one statement."""
        try:
            return psycopg.connect(self._dsn, **self._conn_kwargs)
        except psycopg.Error as exc:
            raise self._failure(exc) from None

    @contextlib.contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled autocommit connection; database failures come out as KeyStoreError (transient)."""
        try:
            with self._pool.connection(timeout=self._connect_timeout) as conn:
                yield conn
        except (psycopg.Error, PoolTimeout) as exc:
            raise self._failure(exc) from None

    @contextlib.contextmanager
    def writing(self, what: str) -> Iterator[psycopg.Connection[Any]]:
        """One write transaction. Writers queue on a transaction lock so change numbers follow commit order (a
        refresh that loaded change N has seen every change below N), and the commit notifies every replica."""
        with self.connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (LOCK_CLASS, WRITE_LOCK))
            yield conn
            conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, what))

    def _failure(self, exc: BaseException) -> KeyStoreError:
        message = f"PostgreSQL key store: {describe(exc)}"
        self._mark_degraded(message)
        return KeyStoreError(message)

    def _header(self, conn: psycopg.Connection[Any], passphrase: bytes, scrypt_n: int) -> dict[str, Any]:
        row = conn.execute("SELECT value FROM lkm_meta WHERE name = 'kdf'").fetchone()
        if row is None:
            # The first replica writes the header; a second one racing it keeps the winner's.
            conn.execute("INSERT INTO lkm_meta (name, value) VALUES ('kdf', %s) ON CONFLICT (name) DO NOTHING",
                         (Jsonb(sealed.new_header(HEADER_FORMAT, passphrase, scrypt_n)),))
            row = conn.execute("SELECT value FROM lkm_meta WHERE name = 'kdf'").fetchone()
        assert row is not None
        header: dict[str, Any] = row[0]
        return header

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        """AES-256-GCM under the passphrase-derived master key, as a column holds it (lkm.sealing.seal_bytes)."""
        return seal_bytes(self._aead, plaintext, aad)

    def unseal(self, blob: bytes, aad: bytes) -> bytes:
        """Raises InvalidTag for a blob sealed under another key or id, or altered."""
        return open_bytes(self._aead, blob, aad)

    # --- health --------------------------------------------------------------------------------------------

    def _mark_degraded(self, detail: str) -> None:
        with self._lock:
            if self._health.status is not StoreStatus.DEGRADED:
                log.warning("key store degraded, serving the keys it holds: %s", detail)
                self._health = StoreHealth(StoreStatus.DEGRADED, detail, time.time())

    def _mark_ok(self) -> None:
        with self._lock:
            if self._health.status is not StoreStatus.OK:
                log.warning("key store database reachable again")
                self._health = StoreHealth(StoreStatus.OK, since=time.time())

    def health(self) -> StoreHealth:
        return self._health

    def check(self) -> None:
        """Never raises once open: with the database away the store still unwraps with the keys it holds;
        health() says degraded, and changes fail with a transient KeyStoreError (503 with Retry-After)."""
        if self._pool.closed:
            raise KeyStoreError("the PostgreSQL key store is closed", transient=False)

    # --- reading -------------------------------------------------------------------------------------------

    def _fetch(self, key_id: str) -> _Row | None:
        with self.connection() as conn:
            raw = conn.execute(_SELECT_ONE, (key_id,)).fetchone()
        return self._apply(_parse(raw)) if raw is not None else None

    def refresh(self) -> bool:
        """Loads what changed since the last load (one indexed query when nothing did)."""
        with self._refresh_lock, self.connection() as conn:
            rows = conn.execute("SELECT id, doc, private_key, change FROM lkm_keys WHERE change > %s ORDER BY change",
                                (self._seen,)).fetchall()
            count_row = conn.execute("SELECT count(*) FROM lkm_keys").fetchone()
        changed = False
        for raw in rows:
            try:
                row = _parse(raw)
            except (ValueError, KeyError, TypeError) as exc:
                # One bad row must not hide every other key's changes; a key already loaded keeps its record.
                log.error("skipping an unreadable key row %s: %s", raw[0], exc)
                continue
            self._apply(row)
            changed = True
        if rows:
            self._seen = max(self._seen, *(int(raw[3]) for raw in rows))
        if count_row is not None and int(count_row[0]) < len(self._records):
            changed |= self._drop_deleted()
        self._mark_ok()
        return changed

    def subscribe(self, callback: Callable[[frozenset[str] | None], None]) -> None:
        """`callback` runs on the listener's thread after each notification, with the payloads heard
        ("key:<id>", "hawk:<id>", "frozen:<id>") or None after a reconnect (anything may have changed): how a
        server reloads the Hawk credentials or frozen callers another process changed without waiting for its
        refresh tick."""
        self._subscribers.append(callback)

    def _heard(self, payloads: frozenset[str] | None) -> None:
        if payloads is None or any(p.startswith("key:") for p in payloads):
            try:
                self.refresh()
            except KeyStoreError as exc:
                log.error("key store refresh failed: %s", exc)
        for callback in list(self._subscribers):
            try:
                callback(payloads)
            except Exception:
                log.exception("a change subscriber failed")

    def _drop_deleted(self) -> bool:
        """Rows removed behind lkm's back (a restore, an operator): forget them here too."""
        with self.connection() as conn:
            present = {str(r[0]) for r in conn.execute("SELECT id FROM lkm_keys").fetchall()}
        gone = set(self._records) - present
        with self._lock:
            for key_id in gone:
                for cache in (self._records, self._sealed, self._changes, self._private):
                    cache.pop(key_id, None)
        return bool(gone)

    def _apply(self, row: _Row) -> _Row:
        """Caches a row unless a newer version of it is already cached (a slow reader racing a writer)."""
        key_id = row.record.id
        with self._lock:
            if self._changes.get(key_id, -1) > row.change:
                return _Row(self._records[key_id], self._sealed[key_id], self._changes[key_id])
            self._records[key_id] = row.record
            self._sealed[key_id] = row.sealed
            self._changes[key_id] = row.change
            if row.sealed is None:
                self._private.pop(key_id, None)
        return row

    def _fresh_sealed(self, key_id: str) -> bytes | None:
        """The sealed key as the database has it now (destroyed a moment ago elsewhere?), read once per key and
        process; while the database is away, the copy loaded with the record."""
        if self._health.status is StoreStatus.OK:
            try:
                self._fetch(key_id)
            except KeyStoreError as exc:
                log.warning("opening key %s with the copy loaded earlier: %s", key_id, exc)
        return self._sealed.get(key_id)

    # --- storage hooks of InProcessKeyStore ---------------------------------------------------------------

    def _load_one(self, key_id: str) -> KeyRecord | None:
        # Created a moment ago on another replica, before its notification arrived.
        row = self._fetch(key_id)
        return row.record if row is not None else None

    def _stored_private(self, key_id: str) -> bytes | None:
        return self._fresh_sealed(key_id)

    def _unseal(self, key_id: str, stored: Any) -> bytes:
        return self.unseal(stored, sealed.key_aad(key_id))

    def _keep_private(self, key_id: str, key: rsa.RSAPrivateKey) -> None:
        with self._lock:
            if self._sealed.get(key_id) is not None:  # not destroyed while we were opening it
                self._private[key_id] = key

    # --- writing -------------------------------------------------------------------------------------------

    def lock(self) -> AbstractContextManager[None]:
        """Exclusive across every process and replica on this database (re-entrant in one thread): a session
        advisory lock on a connection of its own, held for the whole section. Should that connection die, the
        database drops the lock, and the section's writes fail with it, so no decision is taken unguarded."""
        return reentrant(self._held, self._advisory_lock)

    @contextlib.contextmanager
    def _advisory_lock(self) -> Iterator[None]:
        conn = self.connect()
        try:
            try:
                conn.execute("SELECT pg_advisory_lock(%s, %s)", (LOCK_CLASS, STORE_LOCK))
            except psycopg.Error as exc:
                raise self._failure(exc) from None
            yield
        finally:
            conn.close()  # ends the session, which releases the lock

    def _insert_new(self, record: KeyRecord, key: rsa.RSAPrivateKey) -> KeyRecord | None:
        blob = self.seal(sealed.pkcs8(key), sealed.key_aad(record.id))
        with self.writing(f"key:{record.id}") as conn:
            raw = conn.execute("INSERT INTO lkm_keys (id, doc, private_key, change) "
                               "VALUES (%s, %s, %s, nextval('lkm_change_seq')) ON CONFLICT (id) DO NOTHING "
                               "RETURNING id, doc, private_key, change",
                               (record.id, Jsonb(record_to_doc(record)), blob)).fetchone()
        return None if raw is None else self._apply(_parse(raw)).record

    def import_record(self, record: KeyRecord) -> KeyRecord:
        """A destroyed key's record, copied from another store (lkm.keystore.RecordImporting)."""
        key_id = parse_key_id(record.id)
        check_record_only(record)
        stored = record.with_changes(id=key_id, backend=self.backend)
        with self.writing(f"key:{key_id}") as conn:
            raw = conn.execute("INSERT INTO lkm_keys (id, doc, private_key, change) "
                               "VALUES (%s, %s, NULL, nextval('lkm_change_seq')) ON CONFLICT (id) DO NOTHING "
                               "RETURNING id, doc, private_key, change",
                               (key_id, Jsonb(record_to_doc(stored)))).fetchone()
        if raw is None:
            return same_key(self.get_key(key_id), record.public_key_der)
        return self._apply(_parse(raw)).record

    def _locked_row(self, conn: psycopg.Connection[Any], key_id: str) -> _Row:
        raw = conn.execute(_SELECT_ONE + " FOR UPDATE", (key_id,)).fetchone()
        if raw is None:
            raise KeyNotFound()
        return _parse(raw)

    def save_record(self, record: KeyRecord) -> KeyRecord:
        key_id = parse_key_id(record.id)
        with self.writing(f"key:{key_id}") as conn:
            current = self._locked_row(conn, key_id).record
            if current.public_key_der != record.public_key_der:
                raise KeyStoreError(f"key {key_id}: refusing to change the public key of a stored key")
            updated = record.with_changes(updated=utcnow())
            raw = conn.execute("UPDATE lkm_keys SET doc = %s, change = nextval('lkm_change_seq') WHERE id = %s "
                               "RETURNING id, doc, private_key, change",
                               (Jsonb(record_to_doc(updated)), key_id)).fetchone()
        assert raw is not None
        return self._apply(_parse(raw)).record

    def destroy_private(self, key_id: str) -> KeyRecord:
        key_id = parse_key_id(key_id)
        with self.writing(f"key:{key_id}") as conn:
            stored = self._locked_row(conn, key_id).record
            # Judged on the row, locked in this transaction: a key enabled a moment ago on another machine is
            # never erased on the strength of an older view.
            check_transition(stored.state, KeyState.DESTROYED, DESTRUCTION_RULE)
            record = stored.with_changes(state=KeyState.DESTROYED, updated=utcnow())
            raw = conn.execute("UPDATE lkm_keys SET doc = %s, private_key = NULL, "
                               "change = nextval('lkm_change_seq') WHERE id = %s "
                               "RETURNING id, doc, private_key, change",
                               (Jsonb(record_to_doc(record)), key_id)).fetchone()
        assert raw is not None
        return self._apply(_parse(raw)).record

    def close(self) -> None:
        if self._listener is not None:
            self._listener.stop()
        self._pool.close()
        with self._lock:
            self._private.clear()


def _parse(raw: tuple[Any, ...]) -> _Row:
    key_id, doc, sealed, change = raw
    record = record_from_doc(doc, backend=PostgresKeyStore.backend)
    if record.id != key_id:
        raise ValueError(f"row {key_id} holds key {record.id}")
    return _Row(record, bytes(sealed) if sealed is not None else None, int(change))
