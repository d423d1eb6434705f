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

import json
import logging
import os
import threading
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from lkm import fsutil
from lkm.errors import KeyNotFound, KeyStoreError
from lkm.keys import (
    DESTRUCTION_RULE,
    KeyRecord,
    KeyState,
    check_transition,
    parse_key_id,
    record_from_doc,
    record_to_doc,
    utcnow,
)
from lkm.keystore import check_record_only, same_key, sealed
from lkm.keystore.inprocess import InProcessKeyStore, reentrant
from lkm.sealing import open_sealed, seal

log = logging.getLogger("lkm.keystore.file")

FORMAT = "lkm-file-keystore"
KEY_FORMAT = "lkm-key"

class FileKeyStore(InProcessKeyStore):
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

    # --- storage hooks of InProcessKeyStore ---------------------------------------------------------------

    def _load_one(self, key_id: str) -> KeyRecord | None:
        self._load_file(self._key_path(key_id))
        return self._records.get(key_id)

    def _stored_private(self, key_id: str) -> Any:
        return self._read_doc(key_id).get("private_key")

    def _unseal(self, key_id: str, stored: Any) -> bytes:
        return open_sealed(self._aead, stored, sealed.key_aad(key_id))

    def _writing(self) -> AbstractContextManager[None]:
        return self._writer()

    def check(self) -> None:
        if not self.keys_dir.is_dir():
            raise KeyStoreError(f"key directory {self.keys_dir} is missing")
        if not os.access(self.keys_dir, os.W_OK | os.R_OK | os.X_OK):
            raise KeyStoreError(f"key directory {self.keys_dir} is not readable and writable")

    def close(self) -> None:
        with self._lock:
            self._private.clear()

    # --- writing -------------------------------------------------------------------------------------------

    def _writer(self) -> AbstractContextManager[None]:
        # Re-entrant per thread: a second flock on a new descriptor would wait for the first forever.
        return reentrant(self._held, lambda: fsutil.file_lock(self._lock_path))

    def lock(self) -> Any:
        """Cross-process exclusive section for read-check-write sequences (rotation)."""
        return self._writer()

    def seal_private_key(self, key_id: str, key: rsa.RSAPrivateKey) -> dict[str, str]:
        """The stored form of a private key, sealed under this store's master key and bound to `key_id`."""
        der = sealed.pkcs8(key)
        return {"alg": "A256GCM", **seal(self._aead, der, sealed.key_aad(key_id))}

    def key_file_bytes(self, record: KeyRecord, key: rsa.RSAPrivateKey | None) -> bytes:
        """The exact bytes of a key file for `record` (lkm bench writes thousands of them directly)."""
        doc = _doc_from_record(record)
        doc["private_key"] = None if key is None else self.seal_private_key(record.id, key)
        return _dump(doc)

    def _insert_new(self, record: KeyRecord, key: rsa.RSAPrivateKey) -> KeyRecord | None:
        if not fsutil.atomic_create(self._key_path(record.id), self.key_file_bytes(record, key)):
            return None
        self._load_file(self._key_path(record.id))
        return self._records[record.id]

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


def _dump(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"


def _doc_from_record(record: KeyRecord) -> dict[str, Any]:
    return {"format": KEY_FORMAT, "version": 1, **record_to_doc(record)}


def _record_from_doc(doc: dict[str, Any]) -> KeyRecord:
    if doc.get("format") != KEY_FORMAT:
        raise ValueError("not an lkm key file")
    return record_from_doc(doc, backend=FileKeyStore.backend)
