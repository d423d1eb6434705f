"""The passphrase-derived master key of a database store, and sealing under it.

The same construction as the file store (scrypt, AES-256-GCM, the key id bound as associated data), so a dump
of the database alone opens nothing. The KDF header (salt, parameters, a sealed check value) lives in the
database itself, written once by the first replica: every replica derives the same key from the same passphrase,
and a replica started with another passphrase stops with a clear error instead of writing keys nobody else can
open. Kept apart from the store so that the shared sealing module of the project can take its place unchanged.
"""

from __future__ import annotations

import hmac
import secrets
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from lkm.errors import KeyStoreError
from lkm.keys import b64, unb64

HEADER_FORMAT = "lkm-postgresql-keystore"
CHECK_PLAINTEXT = b"lkm keystore passphrase check"
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1
NONCE_BYTES = 12


def new_header(passphrase: bytes) -> dict[str, Any]:
    """A fresh KDF header for an empty database: random salt, and the check value sealed under the new key."""
    salt = secrets.token_bytes(16)
    key = _derive(passphrase, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    nonce = secrets.token_bytes(NONCE_BYTES)
    return {"format": HEADER_FORMAT, "version": 1,
            "kdf": {"name": "scrypt", "salt": b64(salt), "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P},
            "check": {"nonce": b64(nonce), "ciphertext": b64(AESGCM(key).encrypt(nonce, CHECK_PLAINTEXT, None))}}


class Sealer:
    """AES-256-GCM under the master key; a sealed blob is nonce || ciphertext-with-tag."""

    def __init__(self, passphrase: bytes, header: dict[str, Any]) -> None:
        if not passphrase:
            raise KeyStoreError("the key store passphrase is empty", transient=False)
        try:
            if header.get("format") != HEADER_FORMAT:
                raise ValueError("not an lkm key store header")
            kdf, check = header["kdf"], header["check"]
            key = _derive(passphrase, unb64(kdf["salt"]), int(kdf["n"]), int(kdf["r"]), int(kdf["p"]))
            plain = AESGCM(key).decrypt(unb64(check["nonce"]), unb64(check["ciphertext"]), None)
        except InvalidTag:
            raise KeyStoreError("wrong passphrase for the PostgreSQL key store", transient=False) from None
        except (ValueError, KeyError, TypeError) as exc:
            raise KeyStoreError(f"unreadable key store header in the database: {exc}", transient=False) from None
        if not hmac.compare_digest(plain, CHECK_PLAINTEXT):
            raise KeyStoreError("wrong passphrase for the PostgreSQL key store", transient=False)
        self._aead = AESGCM(key)

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        nonce = secrets.token_bytes(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, plaintext, aad)

    def open(self, blob: bytes, aad: bytes) -> bytes:
        """Raises InvalidTag for a blob sealed under another key or id, or altered."""
        if len(blob) <= NONCE_BYTES:
            raise InvalidTag()
        return self._aead.decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)


def key_aad(key_id: str) -> bytes:
    """A private key opens only under the id it was sealed for (same binding as the file store)."""
    return f"lkm-key:v1:{key_id}".encode()


def hawk_aad(cred_id: str) -> bytes:
    return f"lkm-hawk:v1:{cred_id}".encode()


def _derive(passphrase: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(passphrase)
