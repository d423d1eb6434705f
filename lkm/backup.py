"""Encrypted, integrity-protected backups of a key store: one file, verifiable without restoring.

A bundle is one JSON document:

    {"format": "lkm-backup", "version": 1, "created": "...Z", "backend": "file",
     "manifest": {"private_keys": true, "keys": [{"id", "state", "public_key_sha256", "private_key": bool}]},
     "kdf": {"name": "scrypt", "salt", "n", "r", "p"}, "cipher": {"name": "AES-256-GCM", "nonce"},
     "ciphertext": "<base64>"}

The ciphertext is AES-256-GCM over the whole payload (every key's metadata, public key and PKCS#8 private key)
under a key derived with scrypt from the backup passphrase; the clear header (format, dates, manifest) is the
GCM associated data, so a changed byte anywhere fails decryption. The manifest lets an operator see what a
bundle holds without the passphrase; `verify` decrypts, checks the manifest against the payload and checks that
every private key is a sound RSA key matching its public key, all without touching a store.

Restore never overwrites: a key whose id is present already is skipped when identical and refused (reported)
when different. A restored key keeps its id, state and dates, except that an `active` key comes back `retired`
when the store already has an active key (one active key per store).

PKCS#11 stores: private keys never leave the HSM, so their bundles hold metadata only (`private_keys: false`);
the keys themselves are backed up with the HSM vendor's tools (see the README).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from lkm import fsutil, lifecycle
from lkm.canonical import canonical_json
from lkm.errors import BackupError as BackupError  # noqa: PLC0414 - re-exported for callers
from lkm.errors import LkmError
from lkm.keys import (
    KeyRecord,
    KeyState,
    b64,
    check_rsa_policy,
    format_time,
    public_der_pkcs1,
    record_from_doc,
    record_to_doc,
    unb64,
    utcnow,
)
from lkm.keystore import KeyStore, RecordImporting
from lkm.sealing import ScryptParams, new_nonce

FORMAT = "lkm-backup"
VERSION = 1
MIN_PASSPHRASE_CHARS = 12
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**16, 8, 1


@runtime_checkable
class ExportingStore(Protocol):
    def export_private_key(self, key_id: str) -> rsa.RSAPrivateKey: ...


@dataclass(frozen=True)
class BundleKey:
    record: KeyRecord
    private_key: rsa.RSAPrivateKey | None


@dataclass(frozen=True)
class Bundle:
    created: str
    backend: str
    private_keys: bool
    keys: tuple[BundleKey, ...]


def _record_doc(record: KeyRecord) -> dict[str, Any]:
    return {**record_to_doc(record), "backend": record.backend}


def _record_from_doc(doc: dict[str, Any]) -> KeyRecord:
    return record_from_doc(doc, backend=str(doc.get("backend") or "file"))


def _manifest_entry(record: KeyRecord, has_private: bool) -> dict[str, Any]:
    return {"id": record.id, "state": record.state.value, "public_key_sha256": lifecycle.public_key_sha256(record),
            "private_key": has_private}


# --- create ----------------------------------------------------------------------------------------------------

def create_backup(store: KeyStore, path: Path, passphrase: bytes) -> Bundle:
    """Writes the bundle atomically (mode 0600) and returns what it holds."""
    if len(passphrase.decode("utf-8", "replace")) < MIN_PASSPHRASE_CHARS:
        raise BackupError(f"the backup passphrase must have at least {MIN_PASSPHRASE_CHARS} characters")
    exporting = isinstance(store, ExportingStore)
    bundle_keys = collect_keys(store)
    entries: list[dict[str, Any]] = []
    manifest_keys: list[dict[str, Any]] = []
    for item in bundle_keys:
        der = item.private_key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()) if item.private_key else None
        entries.append({"record": _record_doc(item.record), "private_key_pkcs8": b64(der) if der else None})
        manifest_keys.append(_manifest_entry(item.record, der is not None))
    header = {"format": FORMAT, "version": VERSION, "created": format_time(utcnow()), "backend": store.backend,
              "manifest": {"private_keys": exporting, "keys": manifest_keys}}
    params, nonce = ScryptParams.fresh(_SCRYPT_N, _SCRYPT_R, _SCRYPT_P), new_nonce()
    ciphertext = AESGCM(params.derive(passphrase)).encrypt(nonce, canonical_json({"keys": entries}),
                                                           canonical_json(header))
    envelope = {**header, "kdf": params.to_doc(),
                "cipher": {"name": "AES-256-GCM", "nonce": b64(nonce)},
                "ciphertext": b64(ciphertext)}
    fsutil.atomic_write(path, json.dumps(envelope, indent=1).encode() + b"\n", mode=0o600)
    return Bundle(str(header["created"]), store.backend, exporting, bundle_keys)


def collect_keys(store: KeyStore) -> tuple[BundleKey, ...]:
    """Every key with its private half (when the store lets it out and it is not destroyed), read in one
    consistent view under the store's lock: what a backup writes and a migration copies."""
    exporting = isinstance(store, ExportingStore)
    keys: list[BundleKey] = []
    with lifecycle.store_lock(store):  # no key changing half-way
        for record in store.list_keys():
            private: rsa.RSAPrivateKey | None = None
            if exporting and record.state is not KeyState.DESTROYED:
                assert isinstance(store, ExportingStore)
                private = store.export_private_key(record.id)
            keys.append(BundleKey(record, private))
    return tuple(keys)


# --- read and verify -------------------------------------------------------------------------------------------

def read_backup(path: Path, passphrase: bytes) -> Bundle:
    """Decrypts and checks a bundle completely; BackupError names the first problem found."""
    try:
        envelope = json.loads(path.read_bytes())
    except OSError as exc:
        raise BackupError(f"cannot read {path}: {exc.strerror}") from None
    except ValueError:
        raise BackupError(f"{path} is not an lkm backup (not JSON)") from None
    if not isinstance(envelope, dict) or envelope.get("format") != FORMAT:
        raise BackupError(f"{path} is not an lkm backup")
    if envelope.get("version") != VERSION:
        raise BackupError(f"{path}: backup version {envelope.get('version')!r} is not supported")
    try:
        header = {k: envelope[k] for k in ("format", "version", "created", "backend", "manifest")}
        kdf, cipher = envelope["kdf"], envelope["cipher"]
        if kdf.get("name") != "scrypt" or cipher.get("name") != "AES-256-GCM":
            raise BackupError(f"{path}: unknown key derivation or cipher")
        key = ScryptParams.from_doc(kdf).derive(passphrase)
        plain = AESGCM(key).decrypt(unb64(cipher["nonce"]), unb64(envelope["ciphertext"]), canonical_json(header))
    except InvalidTag:
        raise BackupError(f"{path}: wrong passphrase, or the bundle was changed or damaged") from None
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise BackupError(f"{path}: malformed bundle ({exc.__class__.__name__})") from None
    return _check_payload(path, header, json.loads(plain))


def _check_payload(path: Path, header: dict[str, Any], payload: dict[str, Any]) -> Bundle:
    manifest = header["manifest"]
    keys: list[BundleKey] = []
    try:
        for entry in payload["keys"]:
            record = _record_from_doc(entry["record"])
            der = entry.get("private_key_pkcs8")
            private = None
            if der is not None:
                loaded = serialization.load_der_private_key(unb64(der), password=None)
                if not isinstance(loaded, rsa.RSAPrivateKey):
                    raise BackupError(f"{path}: key {record.id} is not an RSA key")
                if public_der_pkcs1(loaded.public_key()) != record.public_key_der:
                    raise BackupError(f"{path}: key {record.id}: the private key does not match its public key")
                check_rsa_policy(loaded)
                private = loaded
            keys.append(BundleKey(record, private))
    except LkmError as exc:
        raise BackupError(f"{path}: {exc.message}") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise BackupError(f"{path}: malformed payload ({exc.__class__.__name__})") from None
    listed = [_manifest_entry(k.record, k.private_key is not None) for k in keys]
    if listed != manifest.get("keys"):
        raise BackupError(f"{path}: the manifest does not match the keys inside")
    return Bundle(str(header["created"]), str(header["backend"]), bool(manifest.get("private_keys")), tuple(keys))


# --- restore -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class KeyResult:
    """What became of one key put into a store. A restore and a copy between stores (lkm.keycopy, which is this
    restore fed from the source store) report in this one shape, so that their lines cannot drift apart."""

    key_id: str
    outcome: str  # restore: "restored" | "skipped" | "refused" | "not restored"; copy: lkm.keycopy.CopyResult
    reason: str = ""
    state: str = ""  # the key's state in the store, as restored or found identical; "" when it was not taken

    def line(self) -> str:
        return f"{self.key_id}: {self.outcome}" + "".join(f" ({note})" for note in self.notes())

    def notes(self) -> list[str]:
        """Apart from line() so that a copy can add its proof without restating how a line is written."""
        return [self.reason] if self.reason else []


def restore_backup(store: KeyStore, bundle: Bundle, *,
                   before: Callable[[str], None] | None = None) -> list[KeyResult]:
    """Restores each key on its own; `before(key_id)` is called just before a key goes into the store (to
    announce it durably, so that a crash cannot leave a restored key without a record)."""
    results = []
    with lifecycle.store_lock(store):
        for item in bundle.keys:
            results.append(_restore_one(store, item, before))
    return results


def _restore_one(store: KeyStore, item: BundleKey, before: Callable[[str], None] | None) -> KeyResult:
    record = item.record
    present = {k.id: k for k in store.list_keys()}
    existing = present.get(record.id)
    if existing is not None:
        if existing.public_key_der == record.public_key_der:
            return KeyResult(record.id, "skipped", "identical key already present", existing.state.value)
        return KeyResult(record.id, "refused", "a different key has this id in the store; left untouched")
    if item.private_key is None and record.state is KeyState.DESTROYED and isinstance(store, RecordImporting):
        try:
            store.import_record(record)  # the record only: ids, dates and the fact of destruction travel too
        except LkmError as exc:
            return KeyResult(record.id, "refused", exc.message)
        return KeyResult(record.id, "restored", "destroyed: record only", record.state.value)
    if item.private_key is None:
        why = "destroyed: nothing to restore" if record.state is KeyState.DESTROYED else \
            "the bundle holds no private key (restore the HSM from its own backup)"
        return KeyResult(record.id, "not restored", why)
    state = record.state
    note = ""
    if state is KeyState.ACTIVE and any(k.state is KeyState.ACTIVE for k in present.values()):
        state, note = KeyState.RETIRED, "restored as retired: the store has an active key"
    if before is not None:
        before(record.id)
    try:
        imported = store.import_key(record.id, item.private_key, state=state, label=record.label)
        store.save_record(imported.with_changes(created=record.created, registered=record.registered,
                                                destroy_after=record.destroy_after, extra=record.extra))
    except LkmError as exc:
        return KeyResult(record.id, "refused", exc.message)
    return KeyResult(record.id, "restored", note, state.value)
