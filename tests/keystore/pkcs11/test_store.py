"""The PKCS#11 key store against a real SoftHSM2 token: what only an HSM store must prove.

The behaviour shared with the file store (create, list, errors, vectors, ...) is in tests/keystore/test_contract.py.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lkm.config import KeyStoreSettings, SecretRef
from lkm.errors import Conflict, DecryptionFailed, KeyStoreError, KeyUnusable, UnsupportedAlgorithm
from lkm.keys import PADDINGS, Algorithm, KeyState
from lkm.keystore import UNWRAPPABLE_STATES, KeyStore, StartsDecrypts
from lkm.keystore.pkcs11 import Pkcs11KeyStore
from tests.conftest import VECTORS as SAMPLE
from tests.conftest import vector_key
from tests.hsm import MAKE_TOKEN, SoftHsmToken, create_token, require_softhsm

pytestmark = pytest.mark.hsm

VECTORS = {v["name"]: v for v in SAMPLE["vectors"]}

# Reads a key's objects back from the token in a separate process (the test process never loads the library).
INSPECT = r"""
import json, os, sys, uuid
import pkcs11
from pkcs11 import Attribute as A, ObjectClass

module, label, key_id = sys.argv[1:4]
lib = pkcs11.lib(module)
token = lib.get_token(token_label=label)
flags = ("TOKEN", "PRIVATE", "SENSITIVE", "EXTRACTABLE", "ALWAYS_SENSITIVE", "NEVER_EXTRACTABLE", "LOCAL",
         "DECRYPT", "UNWRAP", "SIGN", "SIGN_RECOVER", "DERIVE", "MODIFIABLE")
with token.open(user_pin=os.environ["LKM_TEST_PIN"]) as session:
    cka_id = uuid.UUID(key_id).bytes
    privates = list(session.get_objects({A.CLASS: ObjectClass.PRIVATE_KEY, A.ID: cka_id}))
    (public,) = session.get_objects({A.CLASS: ObjectClass.PUBLIC_KEY, A.ID: cka_id})
    metas = list(session.get_objects({A.CLASS: ObjectClass.DATA, A.LABEL: "lkm-meta:" + key_id}))
    out = {"private": None, "private_reads": {}, "private_count": len(privates), "metadata_count": len(metas)}
    if privates:
        (private,) = privates
        out["private"] = {name: private[getattr(A, name)] for name in flags}
        out["private"]["KEY_TYPE"] = private[A.KEY_TYPE].name
        out["private"]["ID"] = private[A.ID].hex()
        out["private"]["LABEL"] = private[A.LABEL]
        out["private"]["modulus_bits"] = len(private[A.MODULUS]) * 8
        out["private"]["PUBLIC_EXPONENT"] = int.from_bytes(private[A.PUBLIC_EXPONENT], "big")
        for name in ("PRIVATE_EXPONENT", "PRIME_1", "PRIME_2", "EXPONENT_1", "EXPONENT_2", "COEFFICIENT", "VALUE"):
            try:
                private[getattr(A, name)]
                out["private_reads"][name] = "READABLE"
            except pkcs11.PKCS11Error as exc:
                out["private_reads"][name] = type(exc).__name__
    out["public"] = {name: public[getattr(A, name)] for name in ("TOKEN", "PRIVATE", "ENCRYPT", "WRAP", "VERIFY")}
    out["public"]["ID"] = public[A.ID].hex()
    out["public"]["LABEL"] = public[A.LABEL]
    (meta,) = metas
    out["metadata"] = {"APPLICATION": meta[A.APPLICATION], "LABEL": meta[A.LABEL], "TOKEN": meta[A.TOKEN],
                       "PRIVATE": meta[A.PRIVATE], "VALUE": json.loads(meta[A.VALUE])}
print(json.dumps(out, indent=1, sort_keys=True))
"""


def inspect_key(token: SoftHsmToken, key_id: str) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-c", INSPECT, str(token.module), token.label, key_id],
                          check=True, capture_output=True, text=True,
                          env={**os.environ, "LKM_TEST_PIN": token.pin().decode()})
    result: dict[str, Any] = json.loads(done.stdout)
    if os.environ.get("LKM_SHOW_ATTRIBUTES"):
        print(done.stdout)  # the attribute check, for the closing note
    return result


def wrap(store: KeyStore, key_id: str, secret: bytes, algorithm: Algorithm = Algorithm.RSA_OAEP_SHA1) -> bytes:
    return store.get_key(key_id).public_key.encrypt(secret, PADDINGS[algorithm])


def wait_until(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.1)


def serves(store: Pkcs11KeyStore) -> bool:
    try:
        store.check()
    except KeyStoreError:
        return False
    return True


@pytest.fixture(scope="module")
def generated(pkcs11_store: Pkcs11KeyStore) -> str:
    return pkcs11_store.create_key(state=KeyState.ACTIVE, label="generated").id


@pytest.fixture(scope="module")
def pkcs1_store(module_token: SoftHsmToken, pkcs11_store: Pkcs11KeyStore) -> Any:
    store = module_token.store(allow_pkcs1=True, pool_size=1)
    yield store
    store.close()


# --- objects on the token -----------------------------------------------------------------------------------

def test_generated_key_attributes(pkcs11_store: Pkcs11KeyStore, module_token: SoftHsmToken, generated: str) -> None:
    seen = inspect_key(module_token, generated)
    private = seen["private"]
    assert private["TOKEN"] and private["PRIVATE"] and private["SENSITIVE"]
    assert private["EXTRACTABLE"] is False
    assert private["ALWAYS_SENSITIVE"] is True and private["NEVER_EXTRACTABLE"] is True and private["LOCAL"] is True
    assert private["DECRYPT"] and private["UNWRAP"]
    assert not (private["SIGN"] or private["SIGN_RECOVER"] or private["DERIVE"])
    assert private["KEY_TYPE"] == "RSA" and private["modulus_bits"] == 3072 and private["PUBLIC_EXPONENT"] == 65537
    assert private["ID"] == uuid.UUID(generated).bytes.hex()
    assert private["LABEL"] == f"lkm:{generated}"
    # The private value cannot be read: the token answers CKR_ATTRIBUTE_SENSITIVE (or has no such attribute).
    assert set(seen["private_reads"].values()) <= {"AttributeSensitive", "AttributeTypeInvalid"}
    assert seen["private_reads"]["PRIVATE_EXPONENT"] == "AttributeSensitive"
    assert seen["private_reads"]["PRIME_1"] == "AttributeSensitive"
    public = seen["public"]
    assert public["ENCRYPT"] and public["WRAP"] and not public["VERIFY"] and public["TOKEN"]
    assert public["ID"] == private["ID"] and public["LABEL"] == private["LABEL"]
    meta = seen["metadata"]
    assert meta["APPLICATION"] == "lkm" and meta["LABEL"] == f"lkm-meta:{generated}"
    assert meta["TOKEN"] and meta["PRIVATE"]
    assert meta["VALUE"]["state"] == "active" and meta["VALUE"]["label"] == "generated"
    record = pkcs11_store.get_key(generated)
    assert base64.b64decode(meta["VALUE"]["public_key"]) == record.public_key_der


def test_imported_key_is_sensitive_but_not_always_sensitive(pkcs11_store: Pkcs11KeyStore,
                                                            module_token: SoftHsmToken) -> None:
    key_id = str(uuid.uuid4())
    record = pkcs11_store.import_key(key_id, vector_key("oaep-sha1"), state=KeyState.ACTIVE)
    assert record.extra == {"imported": True}
    seen = inspect_key(module_token, key_id)
    private = seen["private"]
    assert private["SENSITIVE"] and private["EXTRACTABLE"] is False
    assert private["ALWAYS_SENSITIVE"] is False and private["NEVER_EXTRACTABLE"] is False
    assert not private["SIGN"] and private["DECRYPT"]
    assert seen["private_reads"]["PRIVATE_EXPONENT"] == "AttributeSensitive"
    assert seen["metadata"]["VALUE"]["extra"] == {"imported": True}


@pytest.mark.slow
def test_import_can_be_disabled(module_token: SoftHsmToken) -> None:
    store = module_token.store(allow_import=False, pool_size=1)
    try:
        with pytest.raises(Conflict) as caught:
            store.import_key(str(uuid.uuid4()), vector_key("oaep-sha1"), state=KeyState.ACTIVE)
        assert caught.value.code == "import_unsupported"
        assert "does not accept plaintext private keys" in caught.value.message
    finally:
        store.close()


# --- mechanisms ---------------------------------------------------------------------------------------------

def test_oaep_sha1_unwrap(pkcs11_store: Pkcs11KeyStore, generated: str) -> None:
    assert Algorithm.RSA_OAEP_SHA1 in pkcs11_store.supported_algorithms()
    secret = os.urandom(32)
    assert pkcs11_store.decrypt(generated, wrap(pkcs11_store, generated, secret), Algorithm.RSA_OAEP_SHA1) == secret


# A token worker whose cached handle of one key names another key's object now (a token may reuse the handle
# of a destroyed object), in a process of its own like the store's workers.
REUSED_HANDLE = r"""
import json, sys
from lkm.errors import WorkerFailure
from lkm.keystore.pkcs11.protocol import TokenConfig
from lkm.keystore.pkcs11.worker import TokenWorker

module, label, pin, key_id, other_id = sys.argv[1:6]
worker = TokenWorker(TokenConfig(module=module, token_label=label, token_serial=None), pin)
out = {}
for algorithm in ("RSA-OAEP-SHA1", "RSA-PKCS1-V1_5"):
    worker.handles[key_id] = worker._private_key(other_id)
    ciphertext = bytes.fromhex(sys.stdin.readline())
    try:
        out[algorithm] = worker.op_decrypt(key_id, ciphertext, algorithm).hex()
    except WorkerFailure as failure:
        out[algorithm] = failure.kind.value
    out[algorithm + " handle"] = worker.handles[key_id] is not worker.handles[other_id]
print(json.dumps(out))
"""


def test_a_reused_handle_never_decrypts_with_another_key(pkcs11_store: Pkcs11KeyStore, module_token: SoftHsmToken,
                                                         generated: str) -> None:
    other = pkcs11_store.import_key(str(uuid.uuid4()), vector_key("oaep-sha1"), state=KeyState.ACTIVE).id
    secrets = {"RSA-OAEP-SHA1": os.urandom(32), "RSA-PKCS1-V1_5": os.urandom(32)}
    lines = "".join(wrap(pkcs11_store, generated, secret, Algorithm(name)).hex() + "\n"
                    for name, secret in secrets.items())
    done = subprocess.run([sys.executable, "-c", REUSED_HANDLE, str(module_token.module), module_token.label,
                           module_token.pin().decode(), generated, other],
                          input=lines, check=True, capture_output=True, text=True)
    answers = json.loads(done.stdout)
    assert answers == {"RSA-OAEP-SHA1": secrets["RSA-OAEP-SHA1"].hex(), "RSA-OAEP-SHA1 handle": True,
                       "RSA-PKCS1-V1_5": secrets["RSA-PKCS1-V1_5"].hex(), "RSA-PKCS1-V1_5 handle": True}


async def test_an_unwrap_is_awaited_on_the_loop_without_a_thread(pkcs11_store: Pkcs11KeyStore,
                                                                 generated: str) -> None:
    """start_decrypt sends to an idle worker's pipe and the loop awaits the answer; what it cannot start at once
    is left to decrypt() (None)."""
    assert isinstance(pkcs11_store, StartsDecrypts)
    pkcs11_store.get_key(generated)  # in memory
    secrets = [os.urandom(32) for _ in range(6)]
    calls_before = threading.active_count()
    answers = [pkcs11_store.start_decrypt(generated, wrap(pkcs11_store, generated, secret), Algorithm.RSA_OAEP_SHA1,
                                          UNWRAPPABLE_STATES) for secret in secrets]
    # Two workers: two operations start, the rest would have to wait for one.
    assert [answer is not None for answer in answers] == [True, True, False, False, False, False]
    assert await asyncio.gather(*(a for a in answers if a is not None)) == secrets[:2]
    assert threading.active_count() == calls_before  # no thread was started to wait on the token
    broken = bytearray(wrap(pkcs11_store, generated, secrets[0]))
    broken[-1] ^= 1
    failing = pkcs11_store.start_decrypt(generated, bytes(broken), Algorithm.RSA_OAEP_SHA1, UNWRAPPABLE_STATES)
    assert failing is not None
    with pytest.raises(DecryptionFailed):
        await failing
    pkcs1 = wrap(pkcs11_store, generated, secrets[0], Algorithm.RSA_PKCS1_V1_5)
    assert pkcs11_store.start_decrypt(generated, pkcs1, Algorithm.RSA_PKCS1_V1_5, UNWRAPPABLE_STATES) is None
    assert pkcs11_store.start_decrypt(str(uuid.uuid4()), pkcs1, Algorithm.RSA_OAEP_SHA1, UNWRAPPABLE_STATES) is None
    # The workers are back in the pool: the blocking path still works.
    assert pkcs11_store.decrypt(generated, wrap(pkcs11_store, generated, secrets[1]),
                                Algorithm.RSA_OAEP_SHA1) == secrets[1]


async def test_a_worker_that_dies_under_an_awaited_unwrap_fails_it_and_is_replaced(
        module_token: SoftHsmToken) -> None:
    store = module_token.store(pool_size=1, retry_interval=0.0)
    try:
        key_id = store.import_key(str(uuid.uuid4()), vector_key("oaep-sha1"), state=KeyState.ACTIVE).id
        (pid,) = store.worker_pids()
        os.kill(pid, signal.SIGSTOP)  # the operation is sent, then its worker dies before answering
        answer = store.start_decrypt(key_id, wrap(store, key_id, b"x" * 32), Algorithm.RSA_OAEP_SHA1,
                                     UNWRAPPABLE_STATES)
        assert answer is not None
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(KeyStoreError, match="died during decrypt"):
            await answer
        secret = os.urandom(32)
        assert store.decrypt(key_id, wrap(store, key_id, secret), Algorithm.RSA_OAEP_SHA1) == secret
        assert store.worker_pids() != [pid]
    finally:
        store.close()


async def test_an_awaited_unwrap_given_up_never_answers_the_next_caller(module_token: SoftHsmToken) -> None:
    """The answer to an operation whose caller went away must not be read as the next operation's answer."""
    store = module_token.store(pool_size=1, retry_interval=0.0)
    try:
        key_id = store.import_key(str(uuid.uuid4()), vector_key("oaep-sha1"), state=KeyState.ACTIVE).id
        first, second = os.urandom(32), os.urandom(32)
        (pid,) = store.worker_pids()
        os.kill(pid, signal.SIGSTOP)  # the first operation is sent and stays unanswered...
        answer = store.start_decrypt(key_id, wrap(store, key_id, first), Algorithm.RSA_OAEP_SHA1,
                                     UNWRAPPABLE_STATES)
        assert answer is not None
        pending = asyncio.ensure_future(answer)
        await asyncio.sleep(0.05)
        pending.cancel()  # ...until its caller gives up
        os.kill(pid, signal.SIGCONT)
        with pytest.raises(asyncio.CancelledError):
            await pending
        assert store.decrypt(key_id, wrap(store, key_id, second), Algorithm.RSA_OAEP_SHA1) == second
    finally:
        store.close()


def test_raw_bench_loops_inside_the_sessions(pkcs11_store: Pkcs11KeyStore, generated: str) -> None:
    from lkm.bench.raw import run_raw

    ciphertexts = [wrap(pkcs11_store, generated, os.urandom(32)) for _ in range(3)]
    assert pkcs11_store.decrypt_loop(generated, ciphertexts, Algorithm.RSA_OAEP_SHA1, 0.2) > 0
    result = run_raw(pkcs11_store, generated, Algorithm.RSA_OAEP_SHA1, threads=2, duration=0.3, warmup=0.1)
    assert result.threads == 2 and result.operations > 0
    with pytest.raises(UnsupportedAlgorithm):  # as decrypt: the store's own algorithm check
        pkcs11_store.decrypt_loop(generated, ciphertexts, Algorithm.RSA_PKCS1_V1_5, 0.1)


def test_oaep_sha256_is_what_the_token_can_do(pkcs11_store: Pkcs11KeyStore, generated: str) -> None:
    info = pkcs11_store.token_info
    if info["model"] == "SoftHSM v2" and info["library_version"] == [2, 6]:
        # Known answer: SoftHSM2 2.6 rejects OAEP with SHA-256, so the probe must have found that out.
        assert Algorithm.RSA_OAEP_SHA256 not in pkcs11_store.supported_algorithms()
    secret = os.urandom(32)
    ciphertext = wrap(pkcs11_store, generated, secret, Algorithm.RSA_OAEP_SHA256)
    if Algorithm.RSA_OAEP_SHA256 in pkcs11_store.supported_algorithms():
        assert pkcs11_store.decrypt(generated, ciphertext, Algorithm.RSA_OAEP_SHA256) == secret
    else:
        # SoftHSM2 2.6 answers CKR_ARGUMENTS_BAD: the store says so instead of failing obscurely.
        with pytest.raises(UnsupportedAlgorithm, match="this key store does not support RSA-OAEP-SHA256"):
            pkcs11_store.decrypt(generated, ciphertext, Algorithm.RSA_OAEP_SHA256)


def test_pkcs1_is_refused_by_default(pkcs11_store: Pkcs11KeyStore, generated: str) -> None:
    assert Algorithm.RSA_PKCS1_V1_5 not in pkcs11_store.supported_algorithms()
    ciphertext = wrap(pkcs11_store, generated, os.urandom(32), Algorithm.RSA_PKCS1_V1_5)
    with pytest.raises(UnsupportedAlgorithm, match="this key store does not support RSA-PKCS1-V1_5"):
        pkcs11_store.decrypt(generated, ciphertext, Algorithm.RSA_PKCS1_V1_5)


def test_pkcs1_when_enabled_answers_valid_and_invalid_padding_alike(pkcs1_store: Pkcs11KeyStore,
                                                                      module_token: SoftHsmToken,
                                                                      generated: str) -> None:
    assert Algorithm.RSA_PKCS1_V1_5 in pkcs1_store.supported_algorithms()
    secret = os.urandom(32)
    assert pkcs1_store.decrypt(generated, wrap(pkcs1_store, generated, secret, Algorithm.RSA_PKCS1_V1_5),
                               Algorithm.RSA_PKCS1_V1_5) == secret
    garbage = os.urandom(384)
    garbage = b"\x00" + garbage[1:]  # below the modulus: the token gets to check the padding, and refuses it
    first = pkcs1_store.decrypt(generated, garbage, Algorithm.RSA_PKCS1_V1_5)
    assert len(first) == 32
    assert pkcs1_store.decrypt(generated, garbage, Algorithm.RSA_PKCS1_V1_5) == first  # deterministic
    assert pkcs1_store.decrypt(generated, b"\x00\x01" + garbage[2:], Algorithm.RSA_PKCS1_V1_5) != first
    # Another store on the token (another process, another replica) answers the same: the secret is the token's.
    other = module_token.store(allow_pkcs1=True, pool_size=1)
    try:
        assert other.decrypt(generated, garbage, Algorithm.RSA_PKCS1_V1_5) == first
    finally:
        other.close()
    # Valid padding around a message of another length is the service's to answer (pkcs1_data_key_length),
    # with the same synthetic value.
    short = wrap(pkcs1_store, generated, b"sixteen bytes!!!", Algorithm.RSA_PKCS1_V1_5)
    assert pkcs1_store.decrypt(generated, short, Algorithm.RSA_PKCS1_V1_5) == b"sixteen bytes!!!"
    assert pkcs1_store.synthetic_plaintext(generated, garbage, 32) == first
    with pytest.raises(DecryptionFailed):  # the length of a ciphertext is public: no secret in refusing it
        pkcs1_store.decrypt(generated, garbage[:100], Algorithm.RSA_PKCS1_V1_5)


def test_pkcs1_vector_when_enabled(pkcs1_store: Pkcs11KeyStore) -> None:
    vector = VECTORS["pkcs1-v1_5"]
    key_id = "7a1d2c3b-4e5f-4a6b-8c7d-9e0f1a2b3c4d"
    pkcs1_store.import_key(key_id, vector_key("pkcs1-v1_5"), state=KeyState.ACTIVE)
    plaintext = pkcs1_store.decrypt(key_id, base64.b64decode(vector["ciphertext_b64"]), Algorithm.RSA_PKCS1_V1_5)
    assert plaintext == base64.b64decode(vector["plaintext_b64"])


# --- one truth on the token ---------------------------------------------------------------------------------

def test_metadata_lives_on_the_token(pkcs11_store: Pkcs11KeyStore, module_token: SoftHsmToken) -> None:
    key_id = str(uuid.uuid4())
    record = pkcs11_store.import_key(key_id, vector_key("oaep-sha1"), state=KeyState.ACTIVE, label="shared")
    other = module_token.store(pool_size=1)
    try:
        assert other.get_key(key_id) == record
        assert any(r.id == key_id for r in other.list_keys())
        retired = pkcs11_store.save_record(record.with_changes(state=KeyState.RETIRED))
        assert other.refresh() is True
        assert other.get_key(key_id) == retired
        assert other.refresh() is False
        other.save_record(other.get_key(key_id).with_changes(state=KeyState.PENDING_DESTRUCTION))
        other.destroy_private(key_id)
        assert pkcs11_store.refresh() is True
        assert pkcs11_store.get_key(key_id).state is KeyState.DESTROYED
        with pytest.raises(KeyUnusable) as caught:
            pkcs11_store.decrypt(key_id, os.urandom(384), Algorithm.RSA_OAEP_SHA1)
        assert caught.value.code == "key_destroyed"
    finally:
        other.close()
    # One metadata object per key (revisions replace each other); the private key is gone, the public one stays.
    seen = inspect_key(module_token, key_id)
    assert seen["metadata"]["VALUE"]["state"] == "destroyed" and seen["metadata_count"] == 1
    assert seen["private"] is None and seen["private_count"] == 0


# --- concurrency --------------------------------------------------------------------------------------------

@pytest.mark.long(4)
@pytest.mark.slow
def test_concurrency_soak(pkcs11_store: Pkcs11KeyStore, generated: str) -> None:
    other = pkcs11_store.import_key(str(uuid.uuid4()), vector_key("oaep-sha1"), state=KeyState.ACTIVE).id
    work = []
    for key_id in (generated, other):
        for _ in range(8):
            secret = os.urandom(32)
            work.append((key_id, wrap(pkcs11_store, key_id, secret), secret))
    pids = pkcs11_store.worker_pids()
    errors: list[BaseException] = []
    done = [0]
    lock = threading.Lock()

    def run(offset: int) -> None:
        try:
            for i in range(150):
                key_id, ciphertext, secret = work[(offset + i) % len(work)]
                assert pkcs11_store.decrypt(key_id, ciphertext, Algorithm.RSA_OAEP_SHA1) == secret
                with lock:
                    done[0] += 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(8)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    print(f"\n{done[0]} unwraps by 8 threads on {len(pids)} HSM workers: {done[0] / elapsed:.0f}/s")
    assert not errors, errors[:3]
    assert done[0] == 8 * 150
    assert pkcs11_store.worker_pids() == pids  # no worker crashed or was replaced


# --- recovery -----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_token_removed_and_back(softhsm_token: SoftHsmToken, tmp_path: Path) -> None:
    store = softhsm_token.store(retry_interval=0.2)
    try:
        key_id = store.import_key(str(uuid.uuid4()), vector_key("oaep-sha1"), state=KeyState.ACTIVE).id
        secret = os.urandom(32)
        ciphertext = wrap(store, key_id, secret)
        assert store.decrypt(key_id, ciphertext, Algorithm.RSA_OAEP_SHA1) == secret
        before = set(store.worker_pids())

        away = tmp_path / "token-away"
        softhsm_token.token_dir.rename(away)
        try:
            for _ in range(3):  # never a wrong answer, never "no such key": unavailable
                with pytest.raises(KeyStoreError) as caught:
                    store.decrypt(key_id, ciphertext, Algorithm.RSA_OAEP_SHA1)
                assert caught.value.transient
            with pytest.raises(KeyStoreError) as caught:
                store.check()
            assert caught.value.transient
            with pytest.raises(KeyStoreError):
                store.refresh()
            time.sleep(0.3)
            with pytest.raises(KeyStoreError):  # a re-initialization attempt while the token is still away
                store.check()
        finally:
            away.rename(softhsm_token.token_dir)

        wait_until(lambda: serves(store))
        assert store.decrypt(key_id, ciphertext, Algorithm.RSA_OAEP_SHA1) == secret
        assert store.refresh() is False
        assert [r.id for r in store.list_keys()] == [key_id]
        assert not before & set(store.worker_pids())  # fresh worker processes, same store object
    finally:
        store.close()


def test_worker_killed(pkcs11_store: Pkcs11KeyStore, generated: str) -> None:
    secret = os.urandom(32)
    ciphertext = wrap(pkcs11_store, generated, secret)
    victim = pkcs11_store.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    answers = 0
    deadline = time.monotonic() + 15
    while answers < 10:
        assert time.monotonic() < deadline
        try:
            assert pkcs11_store.decrypt(generated, ciphertext, Algorithm.RSA_OAEP_SHA1) == secret
            answers += 1
        except KeyStoreError as exc:
            assert exc.transient
            time.sleep(0.1)
    wait_until(lambda: len(pkcs11_store.worker_pids()) == 2 or not serves(pkcs11_store))
    assert victim not in pkcs11_store.worker_pids()


@pytest.mark.slow
def test_token_absent_at_start_then_created(softhsm_conf: tuple[Path, Path]) -> None:
    conf, module = softhsm_conf
    label = f"late-{uuid.uuid4().hex[:8]}"
    pin = "late-pin-1234"
    store = Pkcs11KeyStore(module, token_label=label, pin=pin.encode(), retry_interval=0.2, pool_size=1)
    try:
        with pytest.raises(KeyStoreError) as caught:
            store.check()
        assert caught.value.transient
        with pytest.raises(KeyStoreError) as caught:  # not "no keys": nobody has read them yet
            store.list_keys()
        assert caught.value.transient
        create_token(conf, module, label=label, pin=pin)
        wait_until(lambda: serves(store))
        assert Algorithm.RSA_OAEP_SHA1 in store.supported_algorithms()
        assert store.refresh() is False and store.list_keys() == []
    finally:
        store.close()


@pytest.mark.slow
def test_a_token_missed_by_the_first_start_attempt_is_found_by_the_next(softhsm_conf: tuple[Path, Path]) -> None:
    """SoftHSM2 opened by several processes at once now and then answers NoSuchToken for a token that is there;
    here the token appears just after the first attempt failed, and the store starts available."""
    conf, module = softhsm_conf
    label = f"soon-{uuid.uuid4().hex[:8]}"
    pin = "soon-pin-1234"
    attempts: list[str] = []

    class CreateOnFirstFailure(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("HSM not available at start-up, attempt"):
                attempts.append(record.getMessage())
                if len(attempts) == 1:
                    create_token(conf, module, label=label, pin=pin)

    handler = CreateOnFirstFailure(logging.INFO)
    logger = logging.getLogger("lkm.keystore.pkcs11")
    logger.addHandler(handler)
    previous_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        store = Pkcs11KeyStore(module, token_label=label, pin=pin.encode(), retry_interval=60, pool_size=1)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous_level)
    try:
        assert len(attempts) == 1 and "attempt 1 of 3" in attempts[0], attempts
        store.check()  # no wait for the retry interval (a minute here): available from the start
        assert store.list_keys() == []
    finally:
        store.close()


def test_wrong_pin_is_permanent_and_secret(softhsm_token: SoftHsmToken) -> None:
    with pytest.raises(KeyStoreError) as caught:
        Pkcs11KeyStore(softhsm_token.module, token_label=softhsm_token.label, pin=b"wrong-pin-4711")
    assert not caught.value.transient
    assert "PIN" in str(caught.value) and "wrong-pin-4711" not in str(caught.value)


# --- configuration ------------------------------------------------------------------------------------------

def test_from_settings(module_token: SoftHsmToken) -> None:
    settings = KeyStoreSettings(type="pkcs11", module=module_token.module, token_label=module_token.label,
                                pin=SecretRef(kind="file", name=str(module_token.pin_file), setting="keystore.pin",
                                              source="test"), pool_size=1, pkcs11_allow_pkcs1=True)
    store = Pkcs11KeyStore.from_settings(settings)
    try:
        assert isinstance(store, KeyStore) and store.backend == "pkcs11"
        assert Algorithm.RSA_PKCS1_V1_5 in store.supported_algorithms()
        store.check()
    finally:
        store.close()


def test_without_python_pkcs11(monkeypatch: pytest.MonkeyPatch, module_token: SoftHsmToken) -> None:
    probe = subprocess.run([sys.executable, "-c", "import sys, lkm.keystore.pkcs11; print('pkcs11' in sys.modules)"],
                           check=True, capture_output=True, text=True)
    assert probe.stdout.strip() == "False"  # importing the backend loads neither python-pkcs11 nor the library
    monkeypatch.setattr("lkm.keystore.pkcs11.store.pkcs11_available", lambda: False)
    with pytest.raises(KeyStoreError) as caught:
        module_token.store()
    assert not caught.value.transient
    assert "pip install 'lkm[hsm]'" in str(caught.value)


def test_make_token_script(tmp_path: Path) -> None:
    require_softhsm()
    directory = tmp_path / "dev"
    done = subprocess.run(["bash", str(MAKE_TOKEN), "-d", str(directory), "-l", "dev-token"], check=True,
                          capture_output=True, text=True, env={k: v for k, v in os.environ.items()
                                                               if k != "SOFTHSM2_CONF"})
    conf = directory / "softhsm2.conf"
    assert f"export SOFTHSM2_CONF={conf}" in done.stdout
    assert "type: pkcs11" in done.stdout and "token_label: dev-token" in done.stdout
    assert f"pin: {{file: {directory / 'user.pin'}}}" in done.stdout
    assert (directory / "user.pin").stat().st_mode & 0o777 == 0o600
    assert f"directories.tokendir = {directory / 'tokens'}" in conf.read_text()
    slots = subprocess.run(["softhsm2-util", "--show-slots"], check=True, capture_output=True, text=True,
                           env={**os.environ, "SOFTHSM2_CONF": str(conf)}).stdout
    assert "dev-token" in slots
    again = subprocess.run(["bash", str(MAKE_TOKEN), "-d", str(directory)], check=False, capture_output=True,
                           text=True)
    assert again.returncode != 0 and "already holds a token" in again.stderr
