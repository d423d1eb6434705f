"""One contract for every key store: the same tests against the file store, the PKCS#11 store (SoftHSM2) and
the PostgreSQL store (a throwaway cluster).

A store may lack a padding (SoftHSM2 2.6 has no RSA-OAEP-SHA256; the PKCS#11 store refuses PKCS#1 v1.5 unless
configured): tests skip on that capability, say so, and check that the store refuses it clearly.
"""

from __future__ import annotations

import base64
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from lkm.errors import (
    Conflict,
    DecryptionFailed,
    InvalidRequest,
    KeyNotFound,
    KeyStoreError,
    KeyUnusable,
    UnsupportedAlgorithm,
)
from lkm.keys import (
    KEY_BITS,
    PADDINGS,
    PUBLIC_EXPONENT,
    Algorithm,
    ImportRejected,
    KeyRecord,
    KeyState,
    public_der_pkcs1,
    public_pkcs1_b64,
)
from lkm.keystore import KeyStore, RecordImporting, SyntheticAnswers
from lkm.keystore.file import FileKeyStore
from tests.conftest import TEST_SCRYPT_N, pooled_key, vector_key
from tests.conftest import VECTORS as SAMPLE

VECTORS = SAMPLE["vectors"]
# The sample's vectors carry no key ids: these are ours, fixed so that a failure names the same key every run.
VECTOR_IDS = {"oaep-sha1": "3f0c8c1e-6a55-4a4e-9a0e-2b8f2f1f6d11",
              "pkcs1-v1_5": "9b2e4f7a-1c3d-4e5f-8a6b-7c8d9e0f1a2b"}
VECTOR_ALGORITHMS = {None: Algorithm.RSA_OAEP_SHA1, "pkcs1": Algorithm.RSA_PKCS1_V1_5}
OAEP = (Algorithm.RSA_OAEP_SHA1, Algorithm.RSA_OAEP_SHA256)


@dataclass
class Backend:
    name: str
    store: KeyStore
    open_another: Callable[[], KeyStore]  # a second instance on the same storage (another server, the CLI)


@pytest.fixture(scope="module",
                params=["file", pytest.param("pkcs11", marks=[pytest.mark.hsm, pytest.mark.slow]),
                        pytest.param("postgresql", marks=[pytest.mark.slow])])
def backend(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    opener: Callable[[], KeyStore]
    if request.param == "file":
        path = tmp_path_factory.mktemp("file-keystore") / "ks"

        def opener() -> KeyStore:
            return FileKeyStore(path, b"passphrase", scrypt_n=TEST_SCRYPT_N)
    elif request.param == "postgresql":
        from lkm.keystore.postgresql import PostgresKeyStore

        cluster = request.getfixturevalue("pg_cluster")
        dsn = cluster.dsn(cluster.create_database())

        def opener() -> KeyStore:
            # No change listener: refresh() is the contract here, and a listener that heard a change first
            # would have applied it already (notifications are tested in tests/keystore/test_postgresql.py).
            return PostgresKeyStore(dsn, b"passphrase", listen=False, scrypt_n=TEST_SCRYPT_N)
    else:
        token = request.getfixturevalue("module_token")

        def opener() -> KeyStore:
            store: KeyStore = token.store()
            return store
    store = opener()
    yield Backend(request.param, store, opener)
    store.close()


@pytest.fixture(scope="module")
def created(backend: Backend) -> KeyRecord:
    return backend.store.create_key(state=KeyState.ACTIVE, label="contract")


@pytest.fixture
def another(backend: Backend) -> Iterator[KeyStore]:
    store = backend.open_another()
    yield store
    store.close()


def imported(store: KeyStore, name: str = "oaep-sha1") -> KeyRecord:
    """A key of its own for one test, fast to make (import instead of generation)."""
    return store.import_key(str(uuid.uuid4()), vector_key(name), state=KeyState.ACTIVE)


def wrap(record: KeyRecord, secret: bytes, algorithm: Algorithm = Algorithm.RSA_OAEP_SHA1) -> bytes:
    return record.public_key.encrypt(secret, PADDINGS[algorithm])


# --- keys ---------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_create_list_get(backend: Backend, created: KeyRecord) -> None:
    store = backend.store
    assert store.backend == backend.name and isinstance(store, KeyStore)
    assert created.backend == backend.name and created.state is KeyState.ACTIVE and created.label == "contract"
    assert created.id == str(uuid.UUID(created.id))
    numbers = created.public_key.public_numbers()
    assert numbers.n.bit_length() == KEY_BITS and numbers.e == PUBLIC_EXPONENT
    assert public_pkcs1_b64(created.public_key_der).startswith("MIIBigKCAYEA")
    assert store.get_key(created.id) == created
    assert created.id in [r.id for r in store.list_keys()]
    keys = store.list_keys()
    assert keys == sorted(keys, key=lambda r: (r.created, r.id))


def test_unknown_and_malformed_ids(backend: Backend) -> None:
    unknown = str(uuid.uuid4())
    with pytest.raises(KeyNotFound):
        backend.store.get_key(unknown)
    with pytest.raises(KeyNotFound):
        backend.store.decrypt(unknown, os.urandom(384), Algorithm.RSA_OAEP_SHA1)
    with pytest.raises(KeyNotFound):
        backend.store.destroy_private(unknown)
    with pytest.raises(InvalidRequest):
        backend.store.get_key("not-a-uuid")


def test_check_passes(backend: Backend, another: KeyStore, tmp_path: Path) -> None:
    """check() passes on a healthy store and fails once the store cannot serve (so the pass means something)."""
    backend.store.check()
    broken: KeyStore
    if isinstance(another, FileKeyStore):
        file_store = FileKeyStore(tmp_path / "ks", b"passphrase", scrypt_n=TEST_SCRYPT_N)
        file_store.check()
        file_store.keys_dir.rename(tmp_path / "keys-gone")
        broken = file_store
    else:
        broken = another
        broken.check()
        broken.close()
    with pytest.raises(KeyStoreError):
        broken.check()


# --- decryption ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("algorithm", list(Algorithm))
def test_decrypt_every_supported_padding(backend: Backend, created: KeyRecord, algorithm: Algorithm) -> None:
    secret = os.urandom(32)
    ciphertext = wrap(created, secret, algorithm)
    if algorithm not in backend.store.supported_algorithms():
        with pytest.raises(UnsupportedAlgorithm, match=f"does not support {algorithm.value}"):
            backend.store.decrypt(created.id, ciphertext, algorithm)
        pytest.skip(f"the {backend.name} store does not offer {algorithm.value} (refusal checked)")
    assert backend.store.decrypt(created.id, ciphertext, algorithm) == secret


@pytest.mark.parametrize("algorithm", OAEP)
def test_bad_oaep_ciphertext_fails_uniformly(backend: Backend, created: KeyRecord, algorithm: Algorithm) -> None:
    if algorithm not in backend.store.supported_algorithms():
        pytest.skip(f"the {backend.name} store does not offer {algorithm.value}")
    ciphertext = wrap(created, os.urandom(32), algorithm)
    tampered = bytearray(ciphertext)
    tampered[100] ^= 0x01
    wrong_padding = wrap(created, os.urandom(32), Algorithm.RSA_PKCS1_V1_5)
    for bad in (bytes(tampered), ciphertext[:-1], ciphertext[:100], b"", b"\x00" * 384, wrong_padding):
        with pytest.raises(DecryptionFailed) as caught:
            backend.store.decrypt(created.id, bad, algorithm)
        assert caught.value.message == "decryption failed"


@pytest.mark.slow
@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_platform_vectors(backend: Backend, vector: dict[str, str]) -> None:
    algorithm = VECTOR_ALGORITHMS[vector["decryptType"]]
    key_id = VECTOR_IDS[vector["name"]]
    record = backend.store.import_key(key_id, vector_key(vector["name"]), state=KeyState.ACTIVE,
                                      label=vector["name"])
    assert record.id == key_id and record.public_key_der == public_der_pkcs1(vector_key(vector["name"])
                                                                             .public_key())
    if algorithm not in backend.store.supported_algorithms():
        pytest.skip(f"the {backend.name} store does not offer {algorithm.value} in its default configuration "
                    "(the PKCS#11 store refuses PKCS#1 v1.5 unless allow_pkcs1; "
                    "tests/keystore/pkcs11/test_store.py runs this vector with it enabled)")
    plaintext = backend.store.decrypt(key_id, base64.b64decode(vector["ciphertext_b64"]), algorithm)
    assert plaintext == base64.b64decode(vector["plaintext_b64"])


# --- import -------------------------------------------------------------------------------------------------

def test_import_is_idempotent_for_identical_material(backend: Backend) -> None:
    key_id = str(uuid.uuid4())
    first = backend.store.import_key(key_id, vector_key("oaep-sha1"), state=KeyState.ACTIVE, label="once")
    again = backend.store.import_key(key_id, vector_key("oaep-sha1"), state=KeyState.ACTIVE, label="once")
    assert again == first
    assert [r.id for r in backend.store.list_keys()].count(key_id) == 1


@pytest.mark.slow
def test_import_of_other_material_under_a_taken_id_conflicts(backend: Backend, created: KeyRecord) -> None:
    key_id = str(uuid.uuid4())
    backend.store.import_key(key_id, vector_key("oaep-sha1"), state=KeyState.ACTIVE)
    with pytest.raises(Conflict) as caught:
        backend.store.import_key(key_id, vector_key("pkcs1-v1_5"), state=KeyState.ACTIVE)
    assert caught.value.code == "key_exists"
    with pytest.raises(Conflict):  # a generated key's id cannot be taken over either
        backend.store.import_key(created.id, vector_key("oaep-sha1"), state=KeyState.ACTIVE)
    assert backend.store.get_key(created.id) == created


def test_import_enforces_the_key_policy(backend: Backend) -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(ImportRejected):
        backend.store.import_key(str(uuid.uuid4()), small, state=KeyState.ACTIVE)


# --- metadata -----------------------------------------------------------------------------------------------

def test_save_record_is_seen_by_another_instance(backend: Backend, another: KeyStore) -> None:
    record = imported(backend.store)
    assert another.get_key(record.id) == record  # found without a refresh: created a moment ago elsewhere
    retired = backend.store.save_record(record.with_changes(state=KeyState.RETIRED, label="retired"))
    assert retired.state is KeyState.RETIRED and retired.label == "retired"
    assert retired.updated is not None and record.updated is not None and retired.updated >= record.updated
    assert backend.store.get_key(record.id) == retired
    assert another.refresh() is True
    assert another.get_key(record.id) == retired
    disabled = another.save_record(retired.with_changes(state=KeyState.DISABLED))
    backend.store.refresh()
    assert backend.store.get_key(record.id) == disabled


def test_save_record_cannot_change_the_public_key(backend: Backend, created: KeyRecord) -> None:
    other = imported(backend.store, "pkcs1-v1_5")
    with pytest.raises(Exception) as caught:  # the stores differ in error class
        backend.store.save_record(created.with_changes(public_key_der=other.public_key_der))
    assert not isinstance(caught.value, AssertionError)
    assert backend.store.get_key(created.id).public_key_der == created.public_key_der


def test_destroy_private_only_from_pending_destruction(backend: Backend) -> None:
    record = imported(backend.store)
    secret = os.urandom(32)
    for state in (KeyState.ACTIVE, KeyState.RETIRED, KeyState.DISABLED):
        backend.store.save_record(backend.store.get_key(record.id).with_changes(state=state))
        with pytest.raises(Conflict):
            backend.store.destroy_private(record.id)
    assert backend.store.decrypt(record.id, wrap(record, secret), Algorithm.RSA_OAEP_SHA1) == secret


def test_destroy_private_keeps_metadata(backend: Backend, another: KeyStore) -> None:
    record = imported(backend.store)
    ciphertext = wrap(record, os.urandom(32))
    backend.store.save_record(record.with_changes(state=KeyState.PENDING_DESTRUCTION))
    destroyed = backend.store.destroy_private(record.id)
    assert destroyed.state is KeyState.DESTROYED and destroyed.public_key_der == record.public_key_der
    assert backend.store.get_key(record.id) == destroyed
    for store in (backend.store, another):
        with pytest.raises(KeyUnusable) as caught:
            store.decrypt(record.id, ciphertext, Algorithm.RSA_OAEP_SHA1)
        assert caught.value.code == "key_destroyed"


# --- concurrency --------------------------------------------------------------------------------------------

def test_concurrent_decrypts(backend: Backend, created: KeyRecord) -> None:
    other = imported(backend.store)
    errors: list[BaseException] = []

    def run(record: KeyRecord) -> None:
        try:
            for _ in range(25):
                secret = os.urandom(32)
                assert backend.store.decrypt(record.id, wrap(record, secret), Algorithm.RSA_OAEP_SHA1) == secret
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(record,)) for record in (created, other) * 3]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[:3]


# --- a destroyed key's record, copied from another store -----------------------------------------------------

@pytest.mark.slow
def test_import_record_of_a_destroyed_key(backend: Backend, another: KeyStore, tmp_path: Path) -> None:
    if not isinstance(backend.store, RecordImporting):
        pytest.skip(f"the {backend.name} store keeps metadata in the token's objects; nothing to import")
    source = FileKeyStore(tmp_path / "source", b"passphrase", scrypt_n=TEST_SCRYPT_N)
    try:
        record = pooled_key(source, KeyState.PENDING_DESTRUCTION, "gone")
        destroyed = source.destroy_private(record.id)
        active = pooled_key(source, KeyState.ACTIVE)
    finally:
        source.close()
    stored = backend.store.import_record(destroyed)
    assert (stored.id, stored.state, stored.created, stored.updated, stored.label, stored.public_key_der) == \
        (destroyed.id, KeyState.DESTROYED, destroyed.created, destroyed.updated, "gone", destroyed.public_key_der)
    assert stored.backend == backend.store.backend
    assert backend.store.import_record(destroyed) == stored  # run again: the same record, nothing changes
    another.refresh()
    assert another.get_key(destroyed.id) == stored
    for store in (backend.store, another):
        with pytest.raises(KeyUnusable) as caught:
            store.decrypt(destroyed.id, wrap(destroyed, os.urandom(32)), Algorithm.RSA_OAEP_SHA1)
        assert caught.value.code == "key_destroyed"
    with pytest.raises(Conflict) as clash:
        backend.store.import_record(destroyed.with_changes(public_key_der=active.public_key_der))
    assert clash.value.code == "key_exists"
    with pytest.raises(Conflict) as alive:
        backend.store.import_record(active)
    assert alive.value.code == "private_key_required"
    with pytest.raises(KeyNotFound):
        backend.store.get_key(active.id)


def test_synthetic_pkcs1_answers_are_the_same_in_every_instance(backend: Backend, created: KeyRecord,
                                                                 another: KeyStore) -> None:
    """The secret behind a rejected PKCS#1 padding's answer is the store's, not the process's: another server
    (process, replica) answers the same bytes for the same key and ciphertext."""
    assert isinstance(backend.store, SyntheticAnswers) and isinstance(another, SyntheticAnswers)
    ciphertext = os.urandom(384)
    answer = backend.store.synthetic_plaintext(created.id, ciphertext, 32)
    assert len(answer) == 32
    assert another.synthetic_plaintext(created.id, ciphertext, 32) == answer
    assert backend.store.synthetic_plaintext(created.id, ciphertext, 16) == answer[:16]
    assert backend.store.synthetic_plaintext(created.id, os.urandom(384), 32) != answer
    assert backend.store.synthetic_plaintext(str(uuid.uuid4()), ciphertext, 32) != answer
