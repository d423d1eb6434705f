"""Hawk credentials and the cluster-wide nonce check, in the key store's database.

With several replicas, a credential minted with `lkm hawk create` on one machine must authenticate on all of
them, and a request replayed to another replica must be refused there too. Both tables live next to the keys,
so there is no file to copy and no second system to run.

- Credentials are sealed like private keys (same master key, the credential id as associated data): the HMAC
  key is a secret shared with the platform, and a database dump alone must not yield it.
- The nonce check is one INSERT ... ON CONFLICT round trip: the row's primary key is (id, nonce, ts), so two
  replicas racing on the same nonce cannot both win. An entry whose window has passed may be taken again, as
  the in-memory NonceCache does (the timestamp check refuses such a request anyway). Expired rows are purged
  at most once a window, by whichever replica gets there.
- Every change to credentials NOTIFYs the key store's channel, so replicas can reload at once.

While the database is away these functions raise KeyStoreError; the caller decides (playback must go on: fall
back to the per-server nonce cache and the credentials loaded last).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from cryptography.exceptions import InvalidTag

from lkm.errors import KeyStoreError
from lkm.hawk import ALGORITHM, HawkCredential, Verified
from lkm.hawk_credentials import check_credential_id
from lkm.keystore import KeyStore
from lkm.keystore.health import StoreStatus
from lkm.keystore.postgresql.store import PostgresKeyStore
from lkm.nonces import NonceStore

log = logging.getLogger("lkm.keystore.postgresql")


@dataclass(frozen=True)
class CredentialInfo:
    """A credential as `lkm hawk list` shows it: never the key."""

    id: str
    algorithm: str
    created: datetime


def hawk_aad(cred_id: str) -> bytes:
    """A credential's key opens only under its own id."""
    return f"lkm-hawk:v1:{cred_id}".encode()


class ClusterHawk:
    """Credentials and nonces of every replica on one database."""

    def __init__(self, store: PostgresKeyStore, *, window_seconds: int) -> None:
        self._store = store
        self.window_seconds = window_seconds
        self._purged_at = 0.0
        self._purge_lock = threading.Lock()

    @classmethod
    def of(cls, store: KeyStore, *, window_seconds: int) -> ClusterHawk:
        """For a store opened from the configuration (typed as any KeyStore); a store of another kind is a
        KeyStoreError, since only the PostgreSQL store keeps credentials."""
        if not isinstance(store, PostgresKeyStore):
            raise KeyStoreError(f"the {store.backend} key store keeps no Hawk credentials", transient=False)
        return cls(store, window_seconds=window_seconds)

    # --- credentials -----------------------------------------------------------------------------------------

    def create(self, cred_id: str) -> HawkCredential:
        """A new credential with a random key; ValueError for a bad or taken id."""
        check_credential_id(cred_id)
        credential = HawkCredential(cred_id, secrets.token_urlsafe(32))
        sealed = self._store.seal(credential.key.encode(), hawk_aad(cred_id))
        with self._store.writing(f"hawk:{cred_id}") as conn:
            row = conn.execute("INSERT INTO lkm_hawk_credentials (id, key_sealed, algorithm) VALUES (%s, %s, %s) "
                               "ON CONFLICT (id) DO NOTHING RETURNING id", (cred_id, sealed, ALGORITHM)).fetchone()
        if row is None:
            raise ValueError(f"a Hawk credential with id {cred_id!r} already exists")
        return credential

    def revoke(self, cred_id: str) -> bool:
        """False when there was no such credential."""
        with self._store.writing(f"hawk:{cred_id}") as conn:
            row = conn.execute("DELETE FROM lkm_hawk_credentials WHERE id = %s RETURNING id", (cred_id,)).fetchone()
        return row is not None

    def list(self) -> list[CredentialInfo]:
        with self._store.connection() as conn:
            rows = conn.execute("SELECT id, algorithm, created FROM lkm_hawk_credentials ORDER BY id").fetchall()
        return [CredentialInfo(str(r[0]), str(r[1]), r[2]) for r in rows]

    def load(self) -> dict[str, HawkCredential]:
        """Every credential with its key, for the verifier. A row that does not open (tampered, or sealed under
        another passphrase) is a KeyStoreError naming it, never a credential with a wrong key."""
        with self._store.connection() as conn:
            rows = conn.execute("SELECT id, key_sealed, algorithm FROM lkm_hawk_credentials").fetchall()
        loaded: dict[str, HawkCredential] = {}
        for cred_id, sealed, algorithm in rows:
            try:
                key = self._store.unseal(bytes(sealed), hawk_aad(cred_id)).decode()
            except (InvalidTag, UnicodeDecodeError):
                raise KeyStoreError(f"Hawk credential {cred_id}: sealed key does not open", transient=False) from None
            loaded[cred_id] = HawkCredential(cred_id, key, algorithm)
        return loaded

    def follow(self, apply: Callable[[dict[str, HawkCredential]], object]) -> None:
        """Calls `apply` with the credentials reloaded whenever a change to them is heard (any replica or `lkm
        hawk` on any machine), well within a second; the server's refresh tick still reloads as a fallback."""
        def heard(payloads: frozenset[str] | None) -> None:
            if payloads is not None and not any(p.startswith("hawk:") for p in payloads):
                return
            try:
                apply(self.load())
            except KeyStoreError as exc:  # the credentials loaded last stay live
                log.warning("Hawk credentials not reloaded: %s", exc)
        self._store.subscribe(heard)

    # --- nonces --------------------------------------------------------------------------------------------

    def check_and_remember(self, cred_id: str, nonce: str, ts: int, now: float) -> bool:
        """False when this (id, nonce, ts) was already seen by any replica and is still inside the window;
        the same contract as lkm.hawk.NonceCache.check_and_remember."""
        with self._store.connection() as conn:
            row = conn.execute(
                "INSERT INTO lkm_hawk_nonces (cred_id, nonce, ts, expires) VALUES (%s, %s, %s, to_timestamp(%s)) "
                "ON CONFLICT (cred_id, nonce, ts) DO UPDATE SET expires = EXCLUDED.expires "
                "WHERE lkm_hawk_nonces.expires < to_timestamp(%s) RETURNING 1",
                (cred_id, nonce, ts, ts + self.window_seconds, now)).fetchone()
        self._purge_if_due(now)
        return row is not None

    def remember(self, verified: Verified, fallback: NonceStore) -> bool:
        """check_and_remember for a verified request; with the database away (or failing now), this server's
        own cache decides, so playback goes on and a replay to this same server is still refused."""
        if self._store.health().status is StoreStatus.OK:
            try:
                return self.check_and_remember(*verified.nonce_key, verified.now)
            except KeyStoreError as exc:
                log.warning("cluster nonce check unavailable, using this server's cache: %s", exc)
        return fallback.check_and_remember(*verified.nonce_key, verified.now)

    def _purge_if_due(self, now: float) -> None:
        if now - self._purged_at < self.window_seconds or not self._purge_lock.acquire(blocking=False):
            return
        try:
            self._purged_at = now
            self.purge(now)
        finally:
            self._purge_lock.release()

    def purge(self, now: float | None = None) -> int:
        """Drops nonces whose window has passed; returns how many."""
        with self._store.connection() as conn:
            cursor = conn.execute("DELETE FROM lkm_hawk_nonces WHERE expires < to_timestamp(%s)",
                                  (time.time() if now is None else now,))
            return cursor.rowcount
