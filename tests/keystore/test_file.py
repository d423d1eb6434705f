"""File key store specifics: sealing at rest, permissions, atomic writes, lazy loading.

One test generates a key in the store (and a child process generates in a loop); the others import pooled keys
(`pooled_key`), which the store writes by the same path."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lkm.errors import KeyStoreError
from lkm.keys import Algorithm, KeyState
from lkm.keystore.file import FileKeyStore
from tests.conftest import TEST_SCRYPT_N, pooled_key, wrap

PASS = b"correct horse battery staple"


def open_store(directory: Path) -> FileKeyStore:
    """The store in `directory` (made if absent) with the tests' passphrase and scrypt cost."""
    return FileKeyStore(directory, PASS, scrypt_n=TEST_SCRYPT_N)


@pytest.mark.slow
def test_private_key_is_sealed_at_rest(tmp_path: Path) -> None:
    store = open_store(tmp_path / "ks")
    record = store.create_key(state=KeyState.ACTIVE)
    raw = (tmp_path / "ks" / "keys" / f"{record.id}.json").read_text()
    doc = json.loads(raw)
    assert doc["private_key"]["alg"] == "A256GCM"
    assert "PRIVATE KEY" not in raw and "MII" not in doc["private_key"]["ciphertext"][:3]
    assert stat.S_IMODE(os.stat(tmp_path / "ks" / "keys" / f"{record.id}.json").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "ks").st_mode) == 0o700


@pytest.mark.slow
def test_wrong_passphrase_is_a_clear_error(tmp_path: Path) -> None:
    pooled_key(FileKeyStore(tmp_path / "ks", PASS))
    with pytest.raises(KeyStoreError, match="wrong passphrase"):
        FileKeyStore(tmp_path / "ks", b"not the passphrase")


@pytest.mark.slow
@pytest.mark.parametrize("mode", [0o755, 0o770, 0o707])
def test_refuses_a_directory_others_can_enter(tmp_path: Path, mode: int) -> None:
    open_store(tmp_path / "ks")
    os.chmod(tmp_path / "ks", mode)
    with pytest.raises(KeyStoreError, match="expected no access for group or others"):
        open_store(tmp_path / "ks")


@pytest.mark.slow
def test_key_file_under_another_name_does_not_open(tmp_path: Path) -> None:
    store = open_store(tmp_path / "ks")
    record = pooled_key(store, KeyState.ACTIVE)
    keys = tmp_path / "ks" / "keys"
    doc = json.loads((keys / f"{record.id}.json").read_text())
    other = "11111111-1111-4111-8111-111111111111"
    doc["id"] = other
    (keys / f"{other}.json").write_text(json.dumps(doc))
    os.chmod(keys / f"{other}.json", 0o600)
    fresh = open_store(tmp_path / "ks")
    with pytest.raises(KeyStoreError, match="does not open"):
        fresh.decrypt(other, wrap(record, b"x" * 32), Algorithm.RSA_OAEP_SHA1)


@pytest.mark.slow
def test_private_keys_load_lazily(tmp_path: Path) -> None:
    store = open_store(tmp_path / "ks")
    records = [pooled_key(store, KeyState.RETIRED) for _ in range(3)]
    fresh = open_store(tmp_path / "ks")
    assert len(fresh.list_keys()) == 3
    assert fresh._private == {}  # nothing decrypted at start-up
    assert fresh.decrypt(records[1].id, wrap(records[1], b"l" * 32), Algorithm.RSA_OAEP_SHA1) == b"l" * 32
    assert set(fresh._private) == {records[1].id}


def test_leftover_temp_files_are_ignored(tmp_path: Path) -> None:
    store = open_store(tmp_path / "ks")
    record = pooled_key(store, KeyState.ACTIVE)
    (tmp_path / "ks" / "keys" / f".{record.id}.json.tmp-abc").write_text('{"torn')
    fresh = open_store(tmp_path / "ks")
    assert [r.id for r in fresh.list_keys()] == [record.id]


@pytest.mark.slow
def test_refresh_sees_other_writers(tmp_path: Path) -> None:
    server_view = open_store(tmp_path / "ks")
    cli_view = open_store(tmp_path / "ks")
    record = pooled_key(cli_view, KeyState.ACTIVE)
    assert server_view.refresh() is True
    assert server_view.get_key(record.id).state is KeyState.ACTIVE
    cli_view.save_record(record.with_changes(state=KeyState.DISABLED))
    time.sleep(0.01)
    server_view.refresh()
    assert server_view.get_key(record.id).state is KeyState.DISABLED


CREATE_LOOP = """
import sys
from pathlib import Path
from lkm.keystore.file import FileKeyStore
from lkm.keys import KeyState
store = FileKeyStore(Path(sys.argv[1]), b"correct horse battery staple")
print("ready", flush=True)
while True:
    record = store.create_key(state=KeyState.RETIRED)
    store.save_record(record.with_changes(state=KeyState.DISABLED))
"""


@pytest.mark.slow
def test_killed_writer_leaves_only_whole_keys(tmp_path: Path) -> None:
    """SIGKILL a process in the middle of creating and updating keys: every key file left is whole."""
    path = tmp_path / "ks"
    open_store(path)
    proc = subprocess.Popen([sys.executable, "-c", CREATE_LOOP, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    deadline = time.monotonic() + 60
    while len(list((path / "keys").glob("*.json"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)  # polling a condition: the writer is mid-loop once it has made a few keys
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    store = open_store(path)
    records = store.list_keys()
    assert records, "the writer made no key in time"
    for record in records:
        secret = os.urandom(32)
        assert store.decrypt(record.id, wrap(record, secret), Algorithm.RSA_OAEP_SHA1) == secret
    for name in os.listdir(path / "keys"):
        if not name.startswith("."):
            json.loads((path / "keys" / name).read_text())


@pytest.mark.slow
def test_a_bad_file_does_not_hide_other_changes(tmp_path: Path) -> None:
    server_view = open_store(tmp_path / "ks")
    cli_view = open_store(tmp_path / "ks")
    record = pooled_key(cli_view, KeyState.RETIRED)
    server_view.refresh()
    (tmp_path / "ks" / "keys" / "stray.json").write_text("{not json")
    cli_view.save_record(record.with_changes(state=KeyState.DISABLED))
    server_view.refresh()
    assert server_view.get_key(record.id).state is KeyState.DISABLED
    other = pooled_key(cli_view, KeyState.RETIRED)
    server_view.refresh()
    assert server_view.get_key(other.id).state is KeyState.RETIRED


@pytest.mark.slow
def test_uppercase_ids_are_the_same_key(tmp_path: Path) -> None:
    store = open_store(tmp_path / "ks")
    record = pooled_key(store, KeyState.ACTIVE)
    fresh = open_store(tmp_path / "ks")
    assert fresh.get_key(record.id.upper()).id == record.id
    assert fresh.decrypt(record.id.upper(), wrap(record, b"u" * 32), Algorithm.RSA_OAEP_SHA1) == b"u" * 32


def test_pkcs1_is_offered_only_with_implicit_rejection(tmp_path: Path) -> None:
    from lkm.keystore.inprocess import implicit_rejection

    store = open_store(tmp_path / "ks")
    assert (Algorithm.RSA_PKCS1_V1_5 in store.supported_algorithms()) == implicit_rejection()
    # The OpenSSL inside this project's cryptography (3.2 or later) has it; the platform route relies on it.
    assert implicit_rejection() is True
