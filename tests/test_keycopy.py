"""`lkm keys migrate --to OTHER_CONFIG` through the real CLI: a file store copied into a real PostgreSQL
database and back, every key proved by a test unwrap, ids, states, dates, labels and registration status
kept, safe to run again; and backups of the PostgreSQL store."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from lkm.keys import PADDINGS, Algorithm, KeyRecord, KeyState
from lkm.keystore.file import FileKeyStore
from lkm.keystore.postgresql import PostgresKeyStore
from tests.conftest import TEST_SCRYPT_N, Pki, base_config, pooled_key
from tests.lkmcli import lkm, lkm_here
from tests.pg import PgCluster, seed_pg_store

PG_PASSPHRASE = "another horse battery staple"
BACKUP_PASSPHRASE = "correct horse battery staple backup"


def pg_config(tmp: Path, certs: Pki, dsn: str, name: str = "pg") -> Path:
    directory = tmp / name
    directory.mkdir()
    (directory / "dsn").write_text(dsn + "\n")
    (directory / "pass").write_text(PG_PASSPHRASE + "\n")
    config = base_config(directory, certs, keystore={
        "type": "postgresql", "dsn": {"file": str(directory / "dsn")}, "passphrase": {"file": str(directory / "pass")},
        "pool_max": 2})
    path = directory / "lkm.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def file_config(tmp: Path, certs: Pki, name: str) -> Path:
    directory = tmp / name
    directory.mkdir()
    path = directory / "lkm.yaml"
    path.write_text(yaml.safe_dump(base_config(directory, certs)))
    return path


def comparable(record: KeyRecord) -> tuple[object, ...]:
    return (record.id, record.state, record.created, record.label, record.registered, record.public_key_der,
            record.extra)


@pytest.mark.slow
def test_migrate_file_to_postgresql_and_back(tmp_path: Path, certs: Pki, pg_dsn: str) -> None:
    source_config = file_config(tmp_path, certs, "file")
    source = FileKeyStore(tmp_path / "file" / "keys", b"correct horse battery staple", scrypt_n=TEST_SCRYPT_N)
    try:
        active = pooled_key(source, KeyState.ACTIVE, "current")
        retired = pooled_key(source, KeyState.RETIRED, "old")
        source.save_record(retired.with_changes(registered=retired.created))
        disabled = pooled_key(source, KeyState.DISABLED)
        doomed = pooled_key(source, KeyState.PENDING_DESTRUCTION, "erased")
        destroyed = source.destroy_private(doomed.id)
        before = {r.id: comparable(r) for r in source.list_keys()}
    finally:
        source.close()
    seed_pg_store(pg_dsn, PG_PASSPHRASE)
    target_config = pg_config(tmp_path, certs, pg_dsn)

    first = lkm("keys", "migrate", "-c", str(source_config), "--to", str(target_config))
    assert first.stdout.count("copied (unwrap verified)") == 3, first.stdout
    assert f"{destroyed.id}: copied (destroyed: record only)" in first.stdout, first.stdout
    assert "4 copied, 0 present, 0 refused, 0 not copied" in first.stdout
    again = lkm_here("keys", "migrate", "-c", str(source_config), "--to", str(target_config))
    assert "0 copied, 4 present, 0 refused" in again.stdout, again.stdout

    target = PostgresKeyStore(pg_dsn, PG_PASSPHRASE.encode(), listen=False)
    try:
        assert {r.id: comparable(r) for r in target.list_keys()} == before
        assert target.get_key(disabled.id).state is KeyState.DISABLED
        assert target.get_key(destroyed.id).state is KeyState.DESTROYED
        assert target.get_key(destroyed.id).updated == destroyed.updated
        assert target.get_key(active.id).backend == "postgresql"
    finally:
        target.close()

    back_config = file_config(tmp_path, certs, "back")
    back = lkm_here("keys", "migrate", "-c", str(target_config), "--to", str(back_config))
    assert "4 copied" in back.stdout, back.stdout
    returned = FileKeyStore(tmp_path / "back" / "keys", b"correct horse battery staple", scrypt_n=TEST_SCRYPT_N)
    try:
        assert {r.id: comparable(r) for r in returned.list_keys()} == before
    finally:
        returned.close()


@pytest.mark.slow
def test_migrate_refuses_a_different_key_under_the_same_id(tmp_path: Path, certs: Pki, pg_dsn: str) -> None:
    source_config = file_config(tmp_path, certs, "file")
    source = FileKeyStore(tmp_path / "file" / "keys", b"correct horse battery staple", scrypt_n=TEST_SCRYPT_N)
    target = PostgresKeyStore(pg_dsn, PG_PASSPHRASE.encode(), listen=False, scrypt_n=TEST_SCRYPT_N)
    try:
        record = pooled_key(source, KeyState.ACTIVE)
        other = FileKeyStore(tmp_path / "other", b"x" * 12, scrypt_n=TEST_SCRYPT_N)
        try:
            target.import_key(record.id, other.export_private_key(pooled_key(other, KeyState.ACTIVE).id),
                              state=KeyState.RETIRED)
        finally:
            other.close()
    finally:
        source.close()
        target.close()
    refused = lkm_here("keys", "migrate", "-c", str(source_config), "--to", str(pg_config(tmp_path, certs, pg_dsn)),
                  check=False)
    assert refused.returncode == 1 and f"{record.id}: refused" in refused.stdout, refused.stdout


@pytest.mark.slow
def test_backup_create_verify_restore_on_postgresql(tmp_path: Path, certs: Pki, pg_dsn: str,
                                                    pg_cluster: PgCluster) -> None:
    seed_pg_store(pg_dsn, PG_PASSPHRASE)
    config = pg_config(tmp_path, certs, pg_dsn)
    created = lkm_here("keys", "create", "-c", str(config), "--json")
    assert created.returncode == 0
    env = {"LKM_BACKUP_PASSPHRASE": BACKUP_PASSPHRASE}
    bundle = str(tmp_path / "pg.backup")
    assert "1 key(s) backed up" in lkm_here("backup", "create", "-c", str(config), bundle, env=env).stdout
    assert "OK, whole and decryptable" in lkm_here("backup", "verify", bundle, env=env).stdout
    # Into a second, empty database: the key comes back and unwraps there.
    fresh_dsn = pg_cluster.dsn(pg_cluster.create_database())
    seed_pg_store(fresh_dsn, PG_PASSPHRASE)
    restored = lkm_here("backup", "restore", "-c", str(pg_config(tmp_path, certs, fresh_dsn, "fresh")), bundle, env=env)
    assert "1 restored" in restored.stdout, restored.stdout
    store = PostgresKeyStore(fresh_dsn, PG_PASSPHRASE.encode(), listen=False)
    try:
        (record,) = store.list_keys()
        probe = os.urandom(32)
        assert store.decrypt(record.id, record.public_key.encrypt(probe, PADDINGS[Algorithm.RSA_OAEP_SHA1]),
                             Algorithm.RSA_OAEP_SHA1) == probe
    finally:
        store.close()

