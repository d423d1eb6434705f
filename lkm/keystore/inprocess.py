"""What the stores that decrypt in this process (file, PostgreSQL) share above their storage.

Records and opened private keys are held in memory: the unwrap path looks a key up by its canonical id without
parsing it, and opens a private key once, lazily, from its sealed form. Each store supplies only how its
storage reads one record, reads and unseals a private half, and writes a new key.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric import rsa

from lkm.errors import KeyNotFound, KeyStoreError, KeyUnusable
from lkm.keys import (
    PADDINGS,
    PUBLIC_EXPONENT,
    Algorithm,
    KeyRecord,
    KeyState,
    check_rsa_policy,
    generate_private_key,
    new_key_id,
    parse_key_id,
    public_der_pkcs1,
    utcnow,
)
from lkm.keystore import same_key, sealed, synthetic_plaintext

log = logging.getLogger("lkm.keystore")

ALL_ALGORITHMS = frozenset(Algorithm)
WITHOUT_PKCS1 = ALL_ALGORITHMS - {Algorithm.RSA_PKCS1_V1_5}


@functools.cache
def implicit_rejection() -> bool:
    """Whether this OpenSSL answers a bad PKCS#1 v1.5 padding with pseudo-random bytes (3.2+) instead of an
    error. Without it, RSA-PKCS1-V1_5 would be a padding oracle, so these stores do not offer it."""
    probe = rsa.generate_private_key(public_exponent=PUBLIC_EXPONENT, key_size=1024)  # noqa: S505 - throwaway probe
    modulus_bytes = probe.key_size // 8
    try:
        probe.decrypt(b"\x00" + b"\x5a" * (modulus_bytes - 1), PADDINGS[Algorithm.RSA_PKCS1_V1_5])
    except ValueError:
        log.warning("this OpenSSL reports bad PKCS#1 v1.5 padding as an error; RSA-PKCS1-V1_5 is disabled")
        return False
    return True


@contextlib.contextmanager
def reentrant(held: threading.local, acquire: Callable[[], AbstractContextManager[Any]]) -> Iterator[None]:
    """An exclusive section a thread may enter again while inside it (a lifecycle step holds the store's lock
    around create_key/save_record, which lock too): only the outermost entry acquires."""
    depth: int = getattr(held, "depth", 0)
    if depth:
        held.depth = depth + 1
        try:
            yield
        finally:
            held.depth = depth
        return
    with acquire():
        held.depth = 1
        try:
            yield
        finally:
            held.depth = 0


class InProcessKeyStore(ABC):
    """The KeyStore methods common to the file and PostgreSQL stores; subclasses fill the storage hooks."""

    backend: str
    _records: dict[str, KeyRecord]
    _private: dict[str, rsa.RSAPrivateKey]
    _lock: threading.Lock
    _rejection_secret: bytes

    # --- storage hooks -------------------------------------------------------------------------------------

    @abstractmethod
    def _load_one(self, key_id: str) -> KeyRecord | None:
        """One key's record as storage has it now (written a moment ago by another process?), or None."""

    @abstractmethod
    def _stored_private(self, key_id: str) -> Any:
        """The sealed private half as stored, None once destroyed."""

    @abstractmethod
    def _unseal(self, key_id: str, stored: Any) -> bytes:
        """PKCS#8 DER of a sealed private half; InvalidTag (or KeyError, ValueError, TypeError) when it does not
        open under this store's key for this id."""

    @abstractmethod
    def _insert_new(self, record: KeyRecord, key: rsa.RSAPrivateKey) -> KeyRecord | None:
        """Stores a new key, its private half sealed, unless its id is taken (then None); the record as stored."""

    def _writing(self) -> AbstractContextManager[Any]:
        """What a write of a new key runs inside (the file store: its cross-process lock)."""
        return contextlib.nullcontext()

    def _keep_private(self, key_id: str, key: rsa.RSAPrivateKey) -> None:
        with self._lock:
            self._private[key_id] = key

    # --- reading -------------------------------------------------------------------------------------------

    def supported_algorithms(self) -> frozenset[Algorithm]:
        return ALL_ALGORITHMS if implicit_rejection() else WITHOUT_PKCS1

    def list_keys(self) -> list[KeyRecord]:
        return sorted(self._records.values(), key=lambda r: (r.created, r.id))

    def get_key(self, key_id: str) -> KeyRecord:
        record = self._records.get(key_id)  # the unwrap path passes canonical ids: no parsing on a hit
        if record is None:
            key_id = parse_key_id(key_id)
            record = self._records.get(key_id) or self._load_one(key_id)  # look before saying no
            if record is None:
                raise KeyNotFound()
        return record

    def _private_key(self, key_id: str) -> rsa.RSAPrivateKey:
        key = self._private.get(key_id)
        if key is not None:
            return key
        record = self.get_key(key_id)
        key_id = record.id
        key = self._private.get(key_id)  # asked by a non-canonical spelling of a key already open
        if key is not None:
            return key
        stored = self._stored_private(key_id)
        if stored is None:
            raise KeyUnusable("key has been destroyed", code="key_destroyed")
        try:
            der = self._unseal(key_id, stored)
        except (InvalidTag, KeyError, ValueError, TypeError):
            raise sealed.unsealing_failed(key_id) from None
        loaded = sealed.load_private_key(der, record)
        self._keep_private(key_id, loaded)
        return loaded

    def decrypt(self, key_id: str, ciphertext: bytes, algorithm: Algorithm) -> bytes:
        return sealed.rsa_decrypt(self._private_key(key_id), ciphertext, algorithm)

    def synthetic_plaintext(self, key_id: str, ciphertext: bytes, length: int) -> bytes:
        return synthetic_plaintext(self._rejection_secret, key_id, ciphertext, length)

    def export_private_key(self, key_id: str) -> rsa.RSAPrivateKey:
        """The private half, for an encrypted backup (lkm.backup); KeyUnusable once destroyed."""
        return self._private_key(key_id)

    # --- writing -------------------------------------------------------------------------------------------

    def _write_new(self, key_id: str, key: rsa.RSAPrivateKey, state: KeyState, label: str) -> KeyRecord | None:
        """Stores a new key under `key_id` and keeps its private half at hand; None when the id is taken."""
        now = utcnow()
        record = KeyRecord(id=key_id, state=state, created=now, updated=now,
                           public_key_der=public_der_pkcs1(key.public_key()), backend=self.backend, label=label)
        stored = self._insert_new(record, key)
        if stored is not None:
            self._keep_private(key_id, key)
        return stored

    def create_key(self, *, state: KeyState, label: str = "", key_id: str | None = None) -> KeyRecord:
        key = generate_private_key()
        with self._writing():
            for _ in range(1 if key_id else 3):
                record = self._write_new(key_id or new_key_id(), key, state, label)
                if record is not None:
                    return record
        raise KeyStoreError("could not allocate a key id")

    def import_key(self, key_id: str, private_key: rsa.RSAPrivateKey, *, state: KeyState,
                   label: str = "") -> KeyRecord:
        key_id = parse_key_id(key_id)
        check_rsa_policy(private_key)
        with self._writing():
            record = self._write_new(key_id, private_key, state, label)
            if record is not None:
                return record
            return same_key(self.get_key(key_id), public_der_pkcs1(private_key.public_key()))
