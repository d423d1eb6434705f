"""Key store in PostgreSQL, shared by several lkm replicas on several machines.

Why each choice:
- psycopg 3 with psycopg_pool: the maintained driver; a small pool serves reads that miss the cache and the
  rare writes; `check_connection` drops connections a database restart killed before they are handed out.
- Private keys reach the database sealed (scrypt-derived master key, AES-256-GCM, key id as associated data;
  lkm.keystore.sealed), exactly as in the file store: a dump alone opens no key. The KDF header is
  a row of the database, so every replica with the passphrase derives the same key.
- Every record and every sealed private key is cached in memory. Unwraps never touch the database, so with
  the database away every replica keeps serving the keys it holds; health() then reports degraded, and
  changes fail with a transient KeyStoreError, which the service answers with 503 and Retry-After.
- Every write commits under a transaction advisory lock and takes its change number from one sequence inside
  it, so change numbers follow commit order and a refresh loads only rows above the last number it saw. The
  commit NOTIFYs; a listener thread (own connection) reloads on the notification, well within a second, and the
  server's periodic refresh() reloads anyway, which heals a lost notification.
- lock() is a session advisory lock on a connection of its own, held for the section: one writer per decision
  (scheduled rotation, registration, destruction) across machines. destroy_private re-reads the row with
  SELECT ... FOR UPDATE in its own transaction, so it never acts on a stale view.
- The schema is lkm's own, versioned and migrated at start-up under an advisory lock
  (lkm.keystore.postgresql.schema); a database newer than the code is refused by name.
- Hawk credentials (sealed like keys) and the cluster-wide nonce table live in the same database
  (lkm.keystore.postgresql.hawk), so `lkm hawk` needs no file copied between machines.
"""

from __future__ import annotations

from lkm.keystore.postgresql.store import PostgresKeyStore

__all__ = ["PostgresKeyStore"]
