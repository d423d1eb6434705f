"""The key-store protocol. Backends live in sibling modules and import nothing above `lkm.keys`/`lkm.errors`.

Every method may block (disk, HSM): the service calls them off the event loop. Backends translate their own
failures at their edge: KeyNotFound, DecryptionFailed, UnsupportedAlgorithm, Conflict for the caller's
mistakes; KeyStoreError for trouble of their own (with text meant for logs only).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable
from typing import Protocol, runtime_checkable

from cryptography.hazmat.primitives.asymmetric import rsa

from lkm.errors import Conflict, DecryptionFailed, InternalError, KeyUnusable, UnsupportedAlgorithm
from lkm.keys import Algorithm, KeyRecord, KeyState


@runtime_checkable
class KeyStore(Protocol):
    backend: str
    """Short name for logs and metric labels: "file", "pkcs11"."""

    def supported_algorithms(self) -> frozenset[Algorithm]:
        """Paddings this store can decrypt; the service refuses the others with a clear message."""
        ...

    def list_keys(self) -> list[KeyRecord]: ...

    def get_key(self, key_id: str) -> KeyRecord:
        """Raises KeyNotFound."""
        ...

    def create_key(self, *, state: KeyState, label: str = "", key_id: str | None = None) -> KeyRecord:
        """A new key; `key_id` chosen beforehand (so an audit intent can name it), else a fresh UUID."""
        ...

    def import_key(self, key_id: str, private_key: rsa.RSAPrivateKey, *, state: KeyState,
                   label: str = "") -> KeyRecord:
        """Idempotent for identical material; Conflict when the id holds a different key.

        A store that cannot take plaintext private keys (an HSM policy) raises Conflict with code
        `import_unsupported`.
        """
        ...

    def decrypt(self, key_id: str, ciphertext: bytes, algorithm: Algorithm) -> bytes:
        """The private-key operation. Every cryptographic failure is DecryptionFailed, whatever the cause."""
        ...

    def save_record(self, record: KeyRecord) -> KeyRecord:
        """Persists metadata (state, dates) of an existing key atomically; returns what was stored."""
        ...

    def destroy_private(self, key_id: str) -> KeyRecord:
        """Erases the private half for good; the metadata stays (state `destroyed`)."""
        ...

    def refresh(self) -> bool:
        """Picks up changes other processes made (CLI, other servers). True when something changed."""
        ...

    def check(self) -> None:
        """Raises KeyStoreError when the store cannot serve."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class DecryptLoop(Protocol):
    """A store that can time its private-key operation inside its own session (PKCS#11: one worker's), so a
    benchmark measures the token, not the pipe to it."""

    def decrypt_loop(self, key_id: str, ciphertexts: list[bytes], algorithm: Algorithm, seconds: float) -> int:
        """Decrypts in a loop for `seconds`; returns how many operations completed."""
        ...


@runtime_checkable
class SyntheticAnswers(Protocol):
    """A store that answers a rejected RSA-PKCS1-V1_5 unwrap with a value derived from a secret of its own, the
    same in every process and replica of one store (file, PostgreSQL: from the master key; PKCS#11: a secret
    object on the token). See `synthetic_plaintext`."""

    def synthetic_plaintext(self, key_id: str, ciphertext: bytes, length: int) -> bytes:
        """HMAC-SHA256(store secret, key id || ciphertext), truncated to `length` (at most 32) bytes."""
        ...


SYNTHETIC_MAX_BYTES = hashlib.sha256().digest_size


def synthetic_plaintext(secret: bytes, key_id: str, ciphertext: bytes, length: int) -> bytes:
    """The deterministic answer for a PKCS#1 v1.5 ciphertext whose padding or length is wrong (the countermeasure
    TLS uses for its premaster secret): the same bytes for the same key and ciphertext, nothing learnt."""
    if not 1 <= length <= SYNTHETIC_MAX_BYTES:
        raise ValueError(f"synthetic plaintext length must be 1..{SYNTHETIC_MAX_BYTES}, got {length}")
    return hmac.new(secret, key_id.encode() + ciphertext, hashlib.sha256).digest()[:length]


@runtime_checkable
class RecordImporting(Protocol):
    """A store that can take a key's record without its private half: a destroyed key copied from another store
    (`lkm keys migrate`, a restore), so its id, dates and state travel too. The file and PostgreSQL stores."""

    def import_record(self, record: KeyRecord) -> KeyRecord:
        """Stores `record` (state destroyed only) as it is; idempotent for the same public key; Conflict when the
        id holds a different key or the record is not destroyed (see check_record_only, same_key)."""
        ...


def check_record_only(record: KeyRecord) -> None:
    """Only a destroyed key is stored without its private half; any other state would name a key nobody holds."""
    if record.state is not KeyState.DESTROYED:
        raise Conflict(f"key {record.id} is {record.state.value}: only a destroyed key is imported without its "
                       "private half", code="private_key_required")


def same_key(existing: KeyRecord, public_key_der: bytes) -> KeyRecord:
    """`existing` when it is the same key (an import run again); Conflict when the id holds another key."""
    if existing.public_key_der != public_key_der:
        raise Conflict(f"key {existing.id} already exists with different key material", code="key_exists")
    return existing


# --- the checks before a private-key operation, shared by the service and every backend --------------------------

UNWRAPPABLE_STATES = frozenset({KeyState.PENDING_ACTIVATION, KeyState.ACTIVE, KeyState.RETIRED})
"""States in which the service unwraps with a key."""

HELD_STATES = frozenset(KeyState) - {KeyState.DESTROYED}
"""States in which a store still holds the private half and will decrypt when asked directly."""


def key_unusable(record: KeyRecord) -> KeyUnusable:
    """The refusal for a key whose state forbids unwrapping; the code says why (destroyed or disabled)."""
    if record.state is KeyState.DESTROYED:
        return KeyUnusable("key has been destroyed", code="key_destroyed")
    if record.state is KeyState.PENDING_DESTRUCTION:
        return KeyUnusable("key is disabled and scheduled for destruction", code="key_disabled")
    if record.state is KeyState.DISABLED:
        return KeyUnusable("key is disabled", code="key_disabled")
    raise InternalError(f"state {record.state} is unwrappable")


def usable_record(store: KeyStore, key_id: str, algorithm: Algorithm,
                  states: frozenset[KeyState] = UNWRAPPABLE_STATES) -> KeyRecord:
    """The record of a key that may decrypt with `algorithm` now; KeyNotFound, KeyUnusable or
    UnsupportedAlgorithm otherwise, in that order, whoever asks (the service, or a store guarding itself)."""
    return check_usable(store, store.get_key(key_id), algorithm, states)


def check_usable(store: KeyStore, record: KeyRecord, algorithm: Algorithm,
                 states: frozenset[KeyState] = UNWRAPPABLE_STATES) -> KeyRecord:
    """usable_record's checks, on a record already in hand."""
    if record.state not in states:
        raise key_unusable(record)
    if algorithm not in store.supported_algorithms():
        raise UnsupportedAlgorithm(f"this key store does not support {algorithm.value}")
    return record


@runtime_checkable
class StartsDecrypts(Protocol):
    """A store whose private-key operation runs outside this process (an HSM's worker processes), so that a
    server can await it on its event loop: no thread waits on the token, and none is woken to hand the answer
    back (a hand-off costs both threads a wake-up and a context switch each way)."""

    def start_decrypt(self, key_id: str, ciphertext: bytes, algorithm: Algorithm,
                      states: frozenset[KeyState]) -> Awaitable[bytes] | None:
        """Checks the key as usable_record(states) does, sends the operation and returns its answer to await.
        None when that cannot be done at once without blocking (the key not in memory yet, no worker free, a
        padding whose answer may need more token calls): the caller then calls decrypt() on a thread."""


def check_ciphertext_length(ciphertext: bytes, key_bits: int) -> None:
    """A ciphertext that is not exactly the modulus long fails like any other: uniformly, no oracle."""
    if len(ciphertext) != (key_bits + 7) // 8:
        raise DecryptionFailed()
