"""The key-store protocol. Backends live in sibling modules and import nothing above `lkm.keys`/`lkm.errors`.

Every method may block (disk, HSM): the service calls them off the event loop. Backends translate their own
failures at their edge: KeyNotFound, DecryptionFailed, UnsupportedAlgorithm, Conflict for the caller's
mistakes; KeyStoreError for trouble of their own (with text meant for logs only).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from cryptography.hazmat.primitives.asymmetric import rsa

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

    def create_key(self, *, state: KeyState, label: str = "") -> KeyRecord: ...

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
