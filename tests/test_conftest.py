"""The shared fixtures keep their promises: shared things are real and immutable, private things are private."""

from __future__ import annotations

import datetime as dt
import json
import ssl
from pathlib import Path
from typing import Any

import pytest

from lkm.errors import KeyStoreError
from lkm.keys import KEY_BITS, KeyState, check_rsa_policy, new_key_id, public_der_pkcs1
from lkm.keystore.file import FileKeyStore
from tests.conftest import (
    OAEP_SHA1,
    PASSPHRASE,
    TEST_SCRYPT_N,
    FakeClock,
    KeyPool,
    Pki,
    Running,
    seed_keystore,
)


@pytest.mark.slow
def test_pooled_keys_are_distinct_real_keys(key_pool: KeyPool) -> None:
    keys = [key_pool.take() for _ in range(3)]
    assert len({public_der_pkcs1(key.public_key()) for key in keys}) == 3
    for key in keys:
        check_rsa_policy(key)
        assert key.key_size == KEY_BITS
        assert key.decrypt(key.public_key().encrypt(b"data key", OAEP_SHA1), OAEP_SHA1) == b"data key"


def test_a_pool_hands_out_its_keys_in_turn(key_pool: KeyPool) -> None:
    pool = KeyPool(size=2, factory=key_pool.take)
    first, second, third = pool.take(), pool.take(), pool.take()
    assert first is not second and third is first


def test_a_shared_pool_reads_the_keys_another_process_made(tmp_path: Path, key_pool: KeyPool) -> None:
    maker = KeyPool(size=2, factory=key_pool.take)
    maker.share(tmp_path / "pool")
    made = [public_der_pkcs1(maker.take().public_key()) for _ in range(2)]

    def generate() -> Any:
        raise AssertionError("generated a key that the shared directory holds")
    reader = KeyPool(size=2, factory=generate)
    reader.share(tmp_path / "pool")
    assert [public_der_pkcs1(reader.take().public_key()) for _ in range(2)] == made


async def test_running_create_key_stores_a_usable_key(running: Running) -> None:
    one, two = running.create_key(), running.create_key(KeyState.RETIRED)
    assert one.public_key_der != two.public_key_der and two.state is KeyState.RETIRED
    assert running.store.get_key(one.id) == one


def test_certificates_verify_against_the_ca(certs: Pki) -> None:
    ctx = ssl.create_default_context(cafile=str(certs.ca_file))
    ctx.load_cert_chain(*map(str, certs.client("admin")))
    assert {"server", "admin", "unwrapper", "reader", "unlisted", "expired", "other_ca"} <= set(certs.files)


def test_own_certs_are_a_private_copy(certs: Pki, own_certs: Pki) -> None:
    assert own_certs.dir != certs.dir
    cert, _ = own_certs.client("admin")
    assert cert.parent == own_certs.dir and cert.read_bytes() == certs.client("admin")[0].read_bytes()
    cert.write_text("changed")
    assert certs.client("admin")[0].read_bytes() != b"changed"


def test_a_seeded_keystore_opens_with_the_passphrase_only(tmp_path: Path, key_pool: KeyPool) -> None:
    seed_keystore(tmp_path / "ks")
    store = FileKeyStore(tmp_path / "ks", PASSPHRASE.encode())
    record = store.import_key(new_key_id(), key_pool.take(), state=KeyState.ACTIVE)
    assert store.list_keys() == [record]
    with pytest.raises(KeyStoreError, match="wrong passphrase"):
        FileKeyStore(tmp_path / "ks", b"another passphrase")
    assert json.loads((tmp_path / "ks" / "keystore.json").read_text())["kdf"]["n"] == TEST_SCRYPT_N


def test_only_the_seeded_stores_are_cheap(tmp_path: Path) -> None:
    FileKeyStore(tmp_path / "ks", PASSPHRASE.encode()).close()
    assert json.loads((tmp_path / "ks" / "keystore.json").read_text())["kdf"]["n"] == 2**15  # the production cost


def test_the_fake_clock_moves_only_when_told(clock: FakeClock) -> None:
    before = (clock.monotonic(), clock.time(), clock.now())
    assert (clock.monotonic(), clock.time(), clock.now()) == before
    clock.advance(90)
    assert clock.monotonic() == before[0] + 90 and clock.time() == before[1] + 90
    assert clock.now() - before[2] == dt.timedelta(seconds=90) and clock.now().tzinfo is dt.UTC
    with pytest.raises(ValueError):
        clock.advance(-1)
