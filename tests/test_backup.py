"""Backups through the real CLI: encrypted, verifiable without restoring, restorable into a fresh store (which a
real server then unwraps with), never overwriting a different key. The commands run through `lkm.cli.main` in
the test process (tests/cli/test_backup.py runs `lkm backup` as a child process)."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from lkm import backup
from lkm.keys import KeyState
from lkm.keystore.file import FileKeyStore
from tests.conftest import TEST_SCRYPT_N, VECTORS, Pki, b64, base_config, start_server, vector_key, wrap, write_config
from tests.lkmcli import lkm_here

V0, V1 = "3f0c8c1e-6a55-4a4e-9a0e-2b8f2f1f6d11", "8d6c1f0a-2b3e-4c5d-8e9f-0a1b2c3d4e5f"
PASSPHRASE = "correct horse battery staple backup"


def vector_file(tmp: Path, index: int) -> str:
    path = tmp / f"vector{index}.b64"
    path.write_text(VECTORS["vectors"][index]["private_key_pkcs1_der_b64"])
    return str(path)


def second_config(tmp: Path, certs: Pki, name: str) -> Path:
    directory = tmp / name
    directory.mkdir()
    return write_config(directory, base_config(directory, certs))


def fill_and_back_up(tmp: Path, config: str) -> tuple[Path, dict[str, Any]]:
    lkm_here("keys", "import", "--id", V0, vector_file(tmp, 0), "-c", config)
    lkm_here("keys", "import", "--id", V1, "--state", "retired", vector_file(tmp, 1), "-c", config)
    rotated = json.loads(lkm_here("keys", "rotate", "--json", "-c", config).stdout)
    (tmp / "backup.pass").write_text(PASSPHRASE + "\n")
    bundle = tmp / "keys.lkmbackup"
    out = lkm_here("backup", "create", str(bundle), "--passphrase-file", str(tmp / "backup.pass"), "-c", config).stdout
    assert "3 key(s) backed up" in out
    return bundle, rotated


@pytest.mark.slow
async def test_restore_into_a_fresh_store_and_unwrap_with_every_key(tmp_path: Path, certs: Pki,
                                                                     config_factory: Any) -> None:
    config = str(config_factory())
    bundle, rotated = fill_and_back_up(tmp_path, config)
    assert stat.S_IMODE(bundle.stat().st_mode) == 0o600
    text = bundle.read_text()
    assert VECTORS["vectors"][0]["private_key_pkcs1_der_b64"][:40] not in text  # private keys only encrypted
    envelope = json.loads(text)
    assert {k["id"] for k in envelope["manifest"]["keys"]} == {V0, V1, rotated["id"]}  # readable without it

    env = {"LKM_BACKUP_PASSPHRASE": PASSPHRASE}
    verified = lkm_here("backup", "verify", str(bundle), env=env).stdout
    assert "OK, whole and decryptable" in verified and "3 key(s), 3 with a private key" in verified

    fresh = second_config(tmp_path, certs, "restored")
    restored = lkm_here("backup", "restore", str(bundle), "-c", str(fresh), env=env).stdout
    assert restored.count(": restored") == 3 and "3 restored, 0 skipped, 0 refused" in restored
    again = lkm_here("backup", "restore", str(bundle), "-c", str(fresh), env=env).stdout
    assert "0 restored, 3 skipped" in again

    async with start_server(fresh.parent, certs, fresh) as running:
        states = {k.id: k.state for k in running.store.list_keys()}
        assert states == {V0: KeyState.RETIRED, V1: KeyState.RETIRED, rotated["id"]: KeyState.ACTIVE}
        assert running.store.get_key(rotated["id"]).created.isoformat().startswith(rotated["created"][:19])
        unwrapper = running.native("unwrapper")
        for index, key_id in ((0, V0), (1, V1)):
            vector = VECTORS["vectors"][index]
            algorithm = "RSA-PKCS1-V1_5" if vector["decryptType"] == "pkcs1" else "RSA-OAEP-SHA1"
            reply = await unwrapper.unwrap(key_id, base64.b64decode(vector["ciphertext_b64"]), algorithm)
            assert reply.status == 200 and reply.body["key"] == vector["plaintext_b64"], reply.body
        newest = running.store.get_key(rotated["id"])
        reply = await unwrapper.unwrap(newest.id, wrap(newest, b"r" * 32))
        assert reply.status == 200 and reply.body["key"] == b64(b"r" * 32)
        restores = [e for e in running.audit_lines() if e["action"] == "restore_key" and e["outcome"] != "intent"]
        assert sorted(e["key_id"] for e in restores) == sorted([V0, V1, rotated["id"]])


@pytest.mark.slow
def test_a_damaged_bundle_or_wrong_passphrase_fails_verification(tmp_path: Path, config_factory: Any) -> None:
    config = str(config_factory())
    lkm_here("keys", "import", "--id", V0, vector_file(tmp_path, 0), "-c", config)
    bundle = tmp_path / "one.lkmbackup"
    env = {"LKM_BACKUP_PASSPHRASE": PASSPHRASE}
    lkm_here("backup", "create", str(bundle), "-c", config, env=env)
    assert lkm_here("backup", "verify", str(bundle), env=env).returncode == 0

    wrong = lkm_here("backup", "verify", str(bundle), env={"LKM_BACKUP_PASSPHRASE": "another passphrase!"}, check=False)
    assert wrong.returncode == 1 and "wrong passphrase, or the bundle was changed" in wrong.stderr
    missing = lkm_here("backup", "verify", str(bundle), env={"LKM_BACKUP_PASSPHRASE": ""}, check=False)
    assert missing.returncode == 2 and "--passphrase-file" in missing.stderr

    envelope = json.loads(bundle.read_text())
    damaged = dict(envelope)
    raw = bytearray(base64.b64decode(envelope["ciphertext"]))
    raw[100] ^= 1
    damaged["ciphertext"] = base64.b64encode(bytes(raw)).decode()
    relabelled = json.loads(json.dumps(envelope))
    relabelled["manifest"]["keys"][0]["state"] = "retired"  # the clear manifest is authenticated too
    for name, doc in (("damaged", damaged), ("relabelled", relabelled)):
        path = tmp_path / f"{name}.lkmbackup"
        path.write_text(json.dumps(doc))
        result = lkm_here("backup", "verify", str(path), env=env, check=False)
        assert result.returncode == 1 and "changed or damaged" in result.stderr, name
    short = lkm_here("backup", "create", str(tmp_path / "x"), "-c", config, env={"LKM_BACKUP_PASSPHRASE": "short"},
                check=False)
    assert short.returncode == 1 and "at least 12 characters" in short.stderr


@pytest.mark.slow
def test_restore_never_overwrites_a_different_key(tmp_path: Path, certs: Pki, config_factory: Any) -> None:
    config = str(config_factory())
    env = {"LKM_BACKUP_PASSPHRASE": PASSPHRASE}
    lkm_here("keys", "import", "--id", V0, vector_file(tmp_path, 0), "-c", config)
    lkm_here("keys", "import", "--id", V1, vector_file(tmp_path, 1), "-c", config)
    bundle = tmp_path / "two.lkmbackup"
    lkm_here("backup", "create", str(bundle), "-c", config, env=env)

    other = str(second_config(tmp_path, certs, "other"))
    lkm_here("keys", "import", "--id", V0, vector_file(tmp_path, 0), "-c", other)  # the same key
    lkm_here("keys", "import", "--id", V1, vector_file(tmp_path, 0), "-c", other)  # a different key, same id
    result = lkm_here("backup", "restore", str(bundle), "-c", other, env=env, check=False)
    assert result.returncode == 1
    assert f"{V0}: skipped (identical key already present)" in result.stdout
    assert f"{V1}: refused (a different key has this id in the store; left untouched)" in result.stdout
    store = FileKeyStore(tmp_path / "other" / "keys", b"correct horse battery staple", scrypt_n=TEST_SCRYPT_N)
    try:
        assert store.get_key(V1).public_key_der == store.get_key(V0).public_key_der  # still the other key
    finally:
        store.close()


class MetadataOnly:
    """A store that keeps private keys to itself, as an HSM does (no export_private_key)."""

    backend = "pkcs11"

    def __init__(self, inner: FileKeyStore) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        if name in ("export_private_key", "lock"):
            raise AttributeError(name)
        return getattr(self.inner, name)


@pytest.mark.slow
def test_an_hsm_store_is_backed_up_as_metadata_only(tmp_path: Path) -> None:
    source = FileKeyStore(tmp_path / "hsm", b"pass phrase one", scrypt_n=TEST_SCRYPT_N)
    key = vector_key(0)
    source.import_key(V0, key, state=KeyState.ACTIVE)
    hsm: Any = MetadataOnly(source)
    bundle = backup.create_backup(hsm, tmp_path / "meta.lkmbackup", PASSPHRASE.encode())
    assert not bundle.private_keys and [k.private_key for k in bundle.keys] == [None]
    read = backup.read_backup(tmp_path / "meta.lkmbackup", PASSPHRASE.encode())
    assert read.keys[0].record.id == V0 and read.backend == "pkcs11"
    target = FileKeyStore(tmp_path / "target", b"pass phrase two", scrypt_n=TEST_SCRYPT_N)
    [result] = backup.restore_backup(target, read)
    assert result.outcome == "not restored" and "HSM" in result.reason
    assert target.list_keys() == []
    assert os.path.exists(tmp_path / "meta.lkmbackup")
