"""Passphrase sealing shared by the file key store and backups: scrypt derives an AES-256 key, GCM seals.

One home, so the two on-disk formats cannot drift apart in how a passphrase becomes a key or in how a
sealed value is written. The stored parameter block ({"name": "scrypt", "salt", "n", "r", "p"}) is the one
both formats have always written; reading takes the parameters from the file, so a stored bundle or key store
opens whatever cost was chosen when it was made.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from lkm.keys import b64, unb64

KEY_BYTES = 32
SALT_BYTES = 16
NONCE_BYTES = 12


@dataclass(frozen=True)
class ScryptParams:
    """The cost of a derivation; stored next to what it seals, so later readers need no configuration."""

    salt: bytes
    n: int
    r: int = 8
    p: int = 1

    @classmethod
    def fresh(cls, n: int, r: int = 8, p: int = 1) -> ScryptParams:
        return cls(secrets.token_bytes(SALT_BYTES), n, r, p)

    def to_doc(self) -> dict[str, Any]:
        return {"name": "scrypt", "salt": b64(self.salt), "n": self.n, "r": self.r, "p": self.p}

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> ScryptParams:
        """Raises KeyError, ValueError or TypeError on a malformed block; callers word the error for their file."""
        if doc.get("name", "scrypt") != "scrypt":
            raise ValueError("unknown key derivation")
        return cls(unb64(doc["salt"]), int(doc["n"]), int(doc["r"]), int(doc["p"]))

    def derive(self, passphrase: bytes) -> bytes:
        """The AES-256 key; deliberately slow (that is scrypt's job), so callers derive once and keep it."""
        return Scrypt(salt=self.salt, length=KEY_BYTES, n=self.n, r=self.r, p=self.p).derive(passphrase)


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def seal(aead: AESGCM, plaintext: bytes, associated_data: bytes | None) -> dict[str, str]:
    """{"nonce", "ciphertext"} in base64, a fresh nonce each time: the stored form of one sealed value."""
    nonce = new_nonce()
    return {"nonce": b64(nonce), "ciphertext": b64(aead.encrypt(nonce, plaintext, associated_data))}


def open_sealed(aead: AESGCM, sealed: dict[str, Any], associated_data: bytes | None) -> bytes:
    """Inverse of seal; raises InvalidTag (wrong key, changed bytes) or KeyError/ValueError/TypeError (malformed)."""
    return aead.decrypt(unb64(sealed["nonce"]), unb64(sealed["ciphertext"]), associated_data)


def seal_bytes(aead: AESGCM, plaintext: bytes, associated_data: bytes | None) -> bytes:
    """The compact stored form (a database column): nonce || ciphertext-with-tag."""
    nonce = new_nonce()
    return nonce + aead.encrypt(nonce, plaintext, associated_data)


def open_bytes(aead: AESGCM, blob: bytes, associated_data: bytes | None) -> bytes:
    """Inverse of seal_bytes; raises InvalidTag for a blob sealed under another key or id, altered or cut short."""
    if len(blob) <= NONCE_BYTES:
        raise InvalidTag()
    return aead.decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], associated_data)
