"""Key store in a directory: one JSON file per key, the private half sealed with AES-256-GCM.

Layout:
    DIR/keystore.json      salt and scrypt parameters, plus a sealed check value (wrong passphrase = clear error)
    DIR/keys/ID.json       metadata, public key, and the sealed PKCS#8 private key (null once destroyed)
    DIR/.lock              serializes writers across processes (server, CLI)

The master key is derived once per process (scrypt), so start-up does not pay a KDF per key. Each private key
is bound to its id by the GCM associated data: a file copied under another name does not open. Private keys
are decrypted lazily on first use; the RSA consistency check (about 140 ms a key) runs when a key is created
or imported, not when a key that lkm sealed itself is loaded again.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from lkm import fsutil
from lkm.errors import KeyNotFound, KeyStoreError, KeyUnusable
from lkm.keys import (
    DESTRUCTION_RULE,
    PADDINGS,
    PUBLIC_EXPONENT,
    Algorithm,
    KeyRecord,
    KeyState,
    check_rsa_policy,
    check_transition,
    generate_private_key,
    new_key_id,
    parse_key_id,
    public_der_pkcs1,
    record_from_doc,
    record_to_doc,
    utcnow,
)
from lkm.keystore import check_record_only, same_key, sealed, synthetic_plaintext
from lkm.sealing import open_sealed, seal

log = logging.getLogger("lkm.keystore.file")

FORMAT = "lkm-file-keystore"
KEY_FORMAT = "lkm-key"

class FileKeyStore:
    backend = "file"

    def __init__(self, path: Path, passphrase: bytes, *, create: bool = True, scrypt_n: int = sealed.SCRYPT_N) -> None:
        """`scrypt_n` is the scrypt cost written into the header of a NEW store (an existing store keeps the cost
        its header names). Nothing in the configuration lowers it: only tests pass a cheaper one, explicitly."""
        self.path = path
        self.keys_dir = path / "keys"
        self._lock_path = path / ".lock"
        self._lock = threading.Lock()
        self._refresh_lock = threading.Lock()
        self._held = threading.local()  # how deep this thread is inside _writer()
        self._records: dict[str, KeyRecord] = {}
        self._signatures: dict[str, tuple[int, int, int]] = {}
        self._private: dict[str, rsa.RSAPrivateKey] = {}
        self._dir_mtime: int | None = None
        self._scan_started = 0
        if create:
            fsutil.ensure_private_dir(path)
            fsutil.ensure_private_dir(self.keys_dir)
        elif not path.is_dir():
            raise KeyStoreError(f"key store directory {path} does not exist", transient=False)
        for directory in (path, self.keys_dir):
            problem = fsutil.loose_permissions(directory)
            if problem:
                raise KeyStoreError(f"refusing to use the key store: {problem}", transient=False)
        for directory in (path, self.keys_dir):
            fsutil.remove_orphaned_temps(directory)  # left by a writer killed before its rename
        master = self._master_key(passphrase, scrypt_n)
        self._aead = AESGCM(master)
        self._rejection_secret = sealed.rejection_secret(master)
        self.refresh()

    # --- master key ----------------------------------------------------------------------------------------

    def _master_key(self, passphrase: bytes, scrypt_n: int) -> bytes:
        if not passphrase:
            raise KeyStoreError("the key store passphrase is empty", transient=False)
        header_path = self.path / "keystore.json"
        with self._writer():
            if not header_path.exists():
                header = sealed.new_header(FORMAT, passphrase, scrypt_n)
                fsutil.atomic_create(header_path, json.dumps(header, indent=1).encode())
        try:
            header = json.loads(header_path.read_bytes())
        except (OSError, ValueError) as exc:
            raise KeyStoreError(f"unreadable key store header {header_path}: {exc}", transient=False) from None
        return sealed.master_key(header, FORMAT, passphrase, str(self.path))

    # --- reading -------------------------------------------------------------------------------------------

    def supported_algorithms(self) -> frozenset[Algorithm]:
        return ALL_ALGORITHMS if implicit_rejection() else WITHOUT_PKCS1

    def list_keys(self) -> list[KeyRecord]:
        return sorted(self._records.values(), key=lambda r: (r.created, r.id))

    def get_key(self, key_id: str) -> KeyRecord:
        record = self._records.get(key_id)  # the unwrap path passes canonical ids: no parsing on a hit
        if record is None:
            # A key written a moment ago by another process: look before saying no.
            key_id = parse_key_id(key_id)
            record = self._records.get(key_id)
            if record is not None:
                return record
            self._load_file(self._key_path(key_id))
            record = self._records.get(key_id)
            if record is None:
                raise KeyNotFound()
        return record

    def refresh(self) -> bool:
        # One scan at a time: a caller that finds a scan under way waits for it rather than taking the
        # "directory unchanged" shortcut while the other thread is still loading what changed.
        with self._refresh_lock:
            return self._refresh()

    def _refresh(self) -> bool:
        try:
            dir_stat = self.keys_dir.stat()
        except OSError as exc:
            raise KeyStoreError(f"cannot read {self.keys_dir}: {exc.strerror}") from None
        now = dir_stat.st_mtime_ns
        # Every write renames into keys/, which moves the directory's mtime. Rescan only when it moved, or when
        # the last scan began within a second of that change (mtime granularity).
        if self._dir_mtime == now and self._scan_started > now + 1_000_000_000:
            return False
        self._scan_started = time.time_ns()
        self._dir_mtime = now
        changed = False
        seen: set[str] = set()
        with os.scandir(self.keys_dir) as entries:
            for entry in entries:
                if entry.name.startswith(".") or not entry.name.endswith(".json"):
                    continue
                key_id = entry.name[:-5]
                seen.add(key_id)
                st = entry.stat()
                signature = (st.st_mtime_ns, st.st_size, st.st_ino)
                if self._signatures.get(key_id) != signature:
                    try:
                        changed |= self._load_file(Path(entry.path))
                    except KeyStoreError as exc:
                        # One bad file must not hide every other key's changes from this server; a key
                        # already loaded keeps its last good record.
                        log.error("skipping a key file: %s", exc)
        for gone in set(self._records) - seen:
            with self._lock:
                self._records.pop(gone, None)
                self._private.pop(gone, None)
                self._signatures.pop(gone, None)
            changed = True
        return changed

    def _key_path(self, key_id: str) -> Path:
        return self.keys_dir / f"{parse_key_id(key_id)}.json"

    def _load_file(self, path: Path) -> bool:
        try:
            st = path.stat()
            doc = json.loads(path.read_bytes())
            record = _record_from_doc(doc)
        except FileNotFoundError:
            return False
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise KeyStoreError(f"unreadable key file {path}: {exc}") from None
        if f"{record.id}.json" != path.name:
            raise KeyStoreError(f"key file {path} holds key {record.id}; refusing a renamed file")
        with self._lock:
            old = self._records.get(record.id)
            self._records[record.id] = record
            self._signatures[record.id] = (st.st_mtime_ns, st.st_size, st.st_ino)
            if doc.get("private_key") is None or (old and old.public_key_der != record.public_key_der):
                self._private.pop(record.id, None)
        return True

    def _read_doc(self, key_id: str) -> dict[str, Any]:
        path = self._key_path(key_id)
        try:
            doc: dict[str, Any] = json.loads(path.read_bytes())
        except FileNotFoundError:
            raise KeyNotFound() from None
        except (OSError, ValueError) as exc:
            raise KeyStoreError(f"unreadable key file {path}: {exc}") from None
        return doc

    def _private_key(self, key_id: str) -> rsa.RSAPrivateKey:
        key = self._private.get(key_id)
        if key is not None:
            return key
        record = self.get_key(key_id)
        key_id = record.id
        key = self._private.get(key_id)  # asked by a non-canonical spelling of a key already open
        if key is not None:
            return key
        stored = self._read_doc(key_id).get("private_key")
        if stored is None:
            raise KeyUnusable("key has been destroyed", code="key_destroyed")
        try:
            der = open_sealed(self._aead, stored, _aad(key_id))
        except (InvalidTag, KeyError, ValueError, TypeError):
            raise sealed.unsealing_failed(key_id) from None
        loaded = sealed.load_private_key(der, record)
        with self._lock:
            self._private[key_id] = loaded
        return loaded

    def decrypt(self, key_id: str, ciphertext: bytes, algorithm: Algorithm) -> bytes:
        return sealed.rsa_decrypt(self._private_key(key_id), ciphertext, algorithm)

    def synthetic_plaintext(self, key_id: str, ciphertext: bytes, length: int) -> bytes:
        return synthetic_plaintext(self._rejection_secret, key_id, ciphertext, length)

    def check(self) -> None:
        if not self.keys_dir.is_dir():
            raise KeyStoreError(f"key directory {self.keys_dir} is missing")
        if not os.access(self.keys_dir, os.W_OK | os.R_OK | os.X_OK):
            raise KeyStoreError(f"key directory {self.keys_dir} is not readable and writable")

    def close(self) -> None:
        with self._lock:
            self._private.clear()

    # --- writing -------------------------------------------------------------------------------------------

    @contextmanager
    def _writer(self) -> Iterator[None]:
        # Re-entrant per thread: a lifecycle step holds lock() around create_key/save_record, which lock too,
        # and a second flock on a new descriptor would wait for the first forever.
        depth: int = getattr(self._held, "depth", 0)
        if depth:
            self._held.depth = depth + 1
            try:
                yield
            finally:
                self._held.depth = depth
            return
        with fsutil.file_lock(self._lock_path):
            self._held.depth = 1
            try:
                yield
            finally:
                self._held.depth = 0

    def lock(self) -> Any:
        """Cross-process exclusive section for read-check-write sequences (rotation)."""
        return self._writer()

    def export_private_key(self, key_id: str) -> rsa.RSAPrivateKey:
        """The private half, for an encrypted backup (lkm.backup); KeyUnusable once destroyed."""
        return self._private_key(key_id)

    def seal_private_key(self, key_id: str, key: rsa.RSAPrivateKey) -> dict[str, str]:
        """The stored form of a private key, sealed under this store's master key and bound to `key_id`."""
        der = sealed.pkcs8(key)
        return {"alg": "A256GCM", **seal(self._aead, der, _aad(key_id))}

    def key_file_bytes(self, record: KeyRecord, key: rsa.RSAPrivateKey | None) -> bytes:
        """The exact bytes of a key file for `record` (lkm bench writes thousands of them directly)."""
        doc = _doc_from_record(record)
        doc["private_key"] = None if key is None else self.seal_private_key(record.id, key)
        return _dump(doc)

    def _write_new(self, key_id: str, key: rsa.RSAPrivateKey, state: KeyState, label: str) -> KeyRecord | None:
        now = utcnow()
        record = KeyRecord(id=key_id, state=state, created=now, updated=now,
                           public_key_der=public_der_pkcs1(key.public_key()), backend=self.backend, label=label)
        if not fsutil.atomic_create(self._key_path(key_id), self.key_file_bytes(record, key)):
            return None
        self._load_file(self._key_path(key_id))
        with self._lock:
            self._private[key_id] = key
        return self._records[key_id]

    def create_key(self, *, state: KeyState, label: str = "", key_id: str | None = None) -> KeyRecord:
        key = generate_private_key()
        with self._writer():
            for _ in range(1 if key_id else 3):
                record = self._write_new(key_id or new_key_id(), key, state, label)
                if record is not None:
                    return record
        raise KeyStoreError("could not allocate a key id")

    def import_key(self, key_id: str, private_key: rsa.RSAPrivateKey, *, state: KeyState,
                   label: str = "") -> KeyRecord:
        key_id = parse_key_id(key_id)
        check_rsa_policy(private_key)
        with self._writer():
            record = self._write_new(key_id, private_key, state, label)
            if record is not None:
                return record
            return same_key(self.get_key(key_id), public_der_pkcs1(private_key.public_key()))

    def import_record(self, record: KeyRecord) -> KeyRecord:
        """A destroyed key's record, copied from another store (lkm.keystore.RecordImporting)."""
        key_id = parse_key_id(record.id)
        check_record_only(record)
        stored = record.with_changes(id=key_id, backend=self.backend)
        with self._writer():
            if fsutil.atomic_create(self._key_path(key_id), self.key_file_bytes(stored, None)):
                self._load_file(self._key_path(key_id))
                return self._records[key_id]
            return same_key(self.get_key(key_id), record.public_key_der)

    def save_record(self, record: KeyRecord) -> KeyRecord:
        with self._writer():
            doc = self._read_doc(record.id)
            current = _record_from_doc(doc)
            if current.public_key_der != record.public_key_der:
                raise KeyStoreError(f"key {record.id}: refusing to change the public key of a stored key")
            updated = record.with_changes(updated=utcnow())
            new_doc = _doc_from_record(updated)
            new_doc["private_key"] = doc.get("private_key")
            fsutil.atomic_write(self._key_path(record.id), _dump(new_doc))
            self._load_file(self._key_path(record.id))
            return self._records[record.id]

    def destroy_private(self, key_id: str) -> KeyRecord:
        key_id = parse_key_id(key_id)
        with self._writer():
            doc = self._read_doc(key_id)
            stored = _record_from_doc(doc)
            # Checked against the file, under the lock: a key enabled a moment ago by another process is never
            # erased on the strength of an older view.
            check_transition(stored.state, KeyState.DESTROYED, DESTRUCTION_RULE)
            record = stored.with_changes(state=KeyState.DESTROYED, updated=utcnow())
            new_doc = _doc_from_record(record)
            new_doc["private_key"] = None
            fsutil.atomic_write(self._key_path(key_id), _dump(new_doc))
            with self._lock:
                self._private.pop(key_id, None)
            self._load_file(self._key_path(key_id))
            return self._records[key_id]


ALL_ALGORITHMS = frozenset(Algorithm)
WITHOUT_PKCS1 = ALL_ALGORITHMS - {Algorithm.RSA_PKCS1_V1_5}


@functools.cache
def implicit_rejection() -> bool:
    """Whether this OpenSSL answers a bad PKCS#1 v1.5 padding with pseudo-random bytes (3.2+) instead of an
    error. Without it, RSA-PKCS1-V1_5 would be a padding oracle, so the file store does not offer it."""
    probe = rsa.generate_private_key(public_exponent=PUBLIC_EXPONENT, key_size=1024)  # noqa: S505 - throwaway probe
    modulus_bytes = probe.key_size // 8
    try:
        probe.decrypt(b"\x00" + b"\x5a" * (modulus_bytes - 1), PADDINGS[Algorithm.RSA_PKCS1_V1_5])
    except ValueError:
        log.warning("this OpenSSL reports bad PKCS#1 v1.5 padding as an error; RSA-PKCS1-V1_5 is disabled")
        return False
    return True


def _aad(key_id: str) -> bytes:
    return f"{KEY_FORMAT}:v1:{key_id}".encode()


def _dump(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"


def _doc_from_record(record: KeyRecord) -> dict[str, Any]:
    return {"format": KEY_FORMAT, "version": 1, **record_to_doc(record)}


def _record_from_doc(doc: dict[str, Any]) -> KeyRecord:
    if doc.get("format") != KEY_FORMAT:
        raise ValueError("not an lkm key file")
    return record_from_doc(doc, backend=FileKeyStore.backend)
