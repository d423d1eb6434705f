"""The database schema of the PostgreSQL key store, created and migrated by lkm itself.

Migrations are an ordered list; step N takes the schema from version N-1 to N. All pending steps run in one
transaction under an advisory lock, so replicas starting together migrate once and a failed step leaves the
old schema intact. A database already at a version newer than this code is refused by name (an older replica
must not write rows it does not understand), which is what `lkm check-config` reports.
"""

from __future__ import annotations

from typing import Any, LiteralString

import psycopg

from lkm.errors import KeyStoreError

LOCK_CLASS = 0x6C6B6D  # "lkm": first half of every advisory lock key of lkm
MIGRATION_LOCK = 1  # held (transaction scope) while the schema is checked and migrated
STORE_LOCK = 2  # held (session scope) by lock(): one writer per decision across replicas
WRITE_LOCK = 3  # held (transaction scope) by every write: change numbers are handed out in commit order

CHANNEL = "lkm_changes"  # NOTIFY payload: "key:<id>", "hawk:<id>" or "frozen:<id>"

MIGRATIONS: tuple[tuple[LiteralString, ...], ...] = (
    # 1: keys, the KDF header, Hawk credentials and nonces
    (
        "CREATE TABLE lkm_meta (name text PRIMARY KEY, value jsonb NOT NULL)",
        "CREATE SEQUENCE lkm_change_seq",
        # doc is the one stored form of a KeyRecord (lkm.keys.record_to_doc); state is copied out for queries.
        # private_key is nonce || AES-256-GCM(PKCS#8 DER), NULL once destroyed.
        """CREATE TABLE lkm_keys (
               id text PRIMARY KEY,
               doc jsonb NOT NULL,
               state text GENERATED ALWAYS AS (doc->>'state') STORED,
               private_key bytea,
               change bigint NOT NULL)""",
        "CREATE INDEX lkm_keys_change ON lkm_keys (change)",
        """CREATE TABLE lkm_hawk_credentials (
               id text PRIMARY KEY,
               key_sealed bytea NOT NULL,
               algorithm text NOT NULL,
               created timestamptz NOT NULL DEFAULT now())""",
        # Unlogged: a crash or failover empties it, which reopens replays for one skew window at most; the
        # price of logging every request's nonce is not worth that.
        """CREATE UNLOGGED TABLE lkm_hawk_nonces (
               cred_id text NOT NULL,
               nonce text NOT NULL,
               ts bigint NOT NULL,
               expires timestamptz NOT NULL,
               PRIMARY KEY (cred_id, nonce, ts))""",
        "CREATE INDEX lkm_hawk_nonces_expires ON lkm_hawk_nonces (expires)",
    ),
    # 2: the frozen callers (`lkm freeze`, the unwrap-volume breaker), shared by every replica
    (
        """CREATE TABLE lkm_frozen_callers (
               id text PRIMARY KEY,
               mode text NOT NULL,
               frozen_by text NOT NULL,
               frozen_at timestamptz NOT NULL,
               reason text NOT NULL DEFAULT '')""",
    ),
)
CODE_VERSION = len(MIGRATIONS)

_VERSION_TABLE = """CREATE TABLE IF NOT EXISTS lkm_schema_version (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    version integer NOT NULL)"""


def schema_version(conn: psycopg.Connection[Any]) -> int:
    """The version the database is at; 0 for a database lkm never touched."""
    exists = conn.execute("SELECT to_regclass('lkm_schema_version') IS NOT NULL").fetchone()
    if not exists or not exists[0]:
        return 0
    row = conn.execute("SELECT version FROM lkm_schema_version").fetchone()
    return int(row[0]) if row else 0


def migrate(conn: psycopg.Connection[Any]) -> tuple[int, int]:
    """Brings the schema to CODE_VERSION; returns (version found, version now). Raises KeyStoreError when the
    database is newer than this code."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (LOCK_CLASS, MIGRATION_LOCK))
        conn.execute(_VERSION_TABLE)
        found = schema_version(conn)
        if found > CODE_VERSION:
            raise KeyStoreError(f"the database schema is at version {found}, newer than this lkm understands "
                                f"(version {CODE_VERSION}); upgrade lkm before starting it on this database",
                                transient=False)
        for step in MIGRATIONS[found:]:
            for statement in step:
                conn.execute(statement)
        if found < CODE_VERSION:
            conn.execute("INSERT INTO lkm_schema_version (version) VALUES (%s) "
                         "ON CONFLICT (singleton) DO UPDATE SET version = EXCLUDED.version", (CODE_VERSION,))
    return found, CODE_VERSION


def inspect(dsn: str, connect_timeout: float) -> int:
    """The schema version of the database behind `dsn`, read without changing anything (`lkm check-config`);
    KeyStoreError when it cannot be reached or is newer than this code."""
    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=max(1, round(connect_timeout))) as conn:
            found = schema_version(conn)
    except psycopg.Error as exc:
        lines = str(exc).strip().splitlines()
        raise KeyStoreError(f"cannot reach the PostgreSQL key store: {exc.__class__.__name__}: "
                            f"{lines[0] if lines else 'no detail'}") from None
    if found > CODE_VERSION:
        raise KeyStoreError(f"the database's lkm schema is version {found}, newer than this lkm "
                            f"(version {CODE_VERSION}): upgrade lkm before it serves this database",
                            transient=False)
    return found
