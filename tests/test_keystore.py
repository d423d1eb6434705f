"""The checks every unwrap passes before a private-key operation, shared by the service and each backend."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from lkm.errors import DecryptionFailed, InternalError, KeyNotFound, KeyUnusable, UnsupportedAlgorithm
from lkm.keys import Algorithm, KeyState
from lkm.keystore import (
    HELD_STATES,
    UNWRAPPABLE_STATES,
    KeyStore,
    check_ciphertext_length,
    key_unusable,
    usable_record,
)
from lkm.keystore.file import FileKeyStore
from tests.conftest import TEST_SCRYPT_N, vector_key


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> KeyStore:
    return FileKeyStore(tmp_path_factory.mktemp("ks") / "ks", b"a passphrase for these tests", scrypt_n=TEST_SCRYPT_N)


def _key_in(store: KeyStore, state: KeyState) -> str:
    key_id = str(uuid.uuid4())
    store.import_key(key_id, vector_key("oaep-sha1"), state=state)
    return key_id


@pytest.mark.slow
@pytest.mark.parametrize("state", list(KeyState))
def test_only_unwrappable_states_pass(store: KeyStore, state: KeyState) -> None:
    key_id = _key_in(store, state)
    if state in UNWRAPPABLE_STATES:
        assert usable_record(store, key_id, Algorithm.RSA_OAEP_SHA1).id == key_id
    else:
        with pytest.raises(KeyUnusable) as refused:
            usable_record(store, key_id, Algorithm.RSA_OAEP_SHA1)
        assert refused.value.code == ("key_destroyed" if state is KeyState.DESTROYED else "key_disabled")
    # A store guarding itself accepts every state in which it still holds the private half.
    if state in HELD_STATES:
        usable_record(store, key_id, Algorithm.RSA_OAEP_SHA1, HELD_STATES)


def test_unknown_key_comes_before_the_algorithm(store: KeyStore) -> None:
    with pytest.raises(KeyNotFound):
        usable_record(store, str(uuid.uuid4()), Algorithm.RSA_OAEP_SHA256)


def test_an_algorithm_the_store_lacks_is_named(store: KeyStore, tmp_path: Path) -> None:
    key_id = _key_in(store, KeyState.ACTIVE)
    missing = set(Algorithm) - set(store.supported_algorithms())
    for algorithm in missing:  # capability: only paddings this store does not offer
        with pytest.raises(UnsupportedAlgorithm, match=algorithm.value):
            usable_record(store, key_id, algorithm)
    for algorithm in store.supported_algorithms():
        assert usable_record(store, key_id, algorithm).id == key_id


def test_key_unusable_refuses_to_describe_a_usable_key(store: KeyStore) -> None:
    record = store.get_key(_key_in(store, KeyState.ACTIVE))
    with pytest.raises(InternalError):
        key_unusable(record)


@pytest.mark.parametrize("length", [0, 383, 385, 512])
def test_wrong_ciphertext_length_fails_uniformly(length: int) -> None:
    with pytest.raises(DecryptionFailed) as failed:
        check_ciphertext_length(b"\0" * length, 3072)
    assert str(failed.value) == "decryption failed"
    check_ciphertext_length(b"\0" * 384, 3072)
