"""What the passphrase-sealed stores (file, PostgreSQL) share: the master-key header and the private-key path.

The header is {"format", "version", "kdf", "check"}: scrypt parameters (lkm.sealing.ScryptParams) and a check
value sealed under the derived key, so a wrong passphrase is a clear error instead of keys nobody can open. A
private key is opened lazily, checked against the public key of its record, and every decryption failure is
the same DecryptionFailed whatever its cause.
"""

from __future__ import annotations

import hmac
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from lkm.errors import DecryptionFailed, KeyStoreError
from lkm.keys import PADDINGS, Algorithm, KeyRecord, public_der_pkcs1
from lkm.keystore import check_ciphertext_length
from lkm.sealing import ScryptParams, open_sealed, seal

CHECK_PLAINTEXT = b"lkm keystore passphrase check"
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1


def new_header(header_format: str, passphrase: bytes, scrypt_n: int = SCRYPT_N) -> dict[str, Any]:
    """A fresh header for an empty store: random salt, and the check value sealed under the new key. `scrypt_n`
    is the cost a new store records (tests choose a cheap one explicitly; an existing store keeps its own)."""
    _refuse_empty(passphrase)  # before anything is written under it, in every store
    params = ScryptParams.fresh(scrypt_n, SCRYPT_R, SCRYPT_P)
    return {"format": header_format, "version": 1, "kdf": params.to_doc(),
            "check": seal(AESGCM(params.derive(passphrase)), CHECK_PLAINTEXT, None)}


def master_key(header: dict[str, Any], header_format: str, passphrase: bytes, where: str) -> bytes:
    """The key the header's check value opens under; KeyStoreError (permanent) for a wrong passphrase or a
    header that is not ours. `where` names the store in the message."""
    _refuse_empty(passphrase)
    try:
        if header.get("format") != header_format:
            raise ValueError("not an lkm key store header")
        key = ScryptParams.from_doc(header["kdf"]).derive(passphrase)
        plain = open_sealed(AESGCM(key), header["check"], None)
    except InvalidTag:
        raise KeyStoreError(f"wrong passphrase for the key store {where}", transient=False) from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise KeyStoreError(f"unreadable key store header of {where}: {exc}", transient=False) from None
    if not hmac.compare_digest(plain, CHECK_PLAINTEXT):
        raise KeyStoreError(f"wrong passphrase for the key store {where}", transient=False)
    return key


def _refuse_empty(passphrase: bytes) -> None:
    if not passphrase:
        raise KeyStoreError("the key store passphrase is empty", transient=False)


def rejection_secret(master: bytes) -> bytes:
    """The secret of the store's synthetic PKCS#1 answers: derived from its master key, so every process and
    replica that opens the store computes the same one, and it never sits anywhere on its own."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=b"lkm pkcs1 implicit rejection").derive(master)


def load_private_key(der: bytes, record: KeyRecord) -> rsa.RSAPrivateKey:
    """The PKCS#8 key a store sealed itself (no slow RSA validation), refused unless it matches the record."""
    loaded = serialization.load_der_private_key(der, password=None, unsafe_skip_rsa_key_validation=True)
    if not isinstance(loaded, rsa.RSAPrivateKey) or public_der_pkcs1(loaded.public_key()) != record.public_key_der:
        raise KeyStoreError(f"key {record.id}: private key does not match its public key", transient=False)
    return loaded


def unsealing_failed(key_id: str) -> KeyStoreError:
    return KeyStoreError(f"key {key_id}: sealed private key does not open (tampered or other store)",
                         transient=False)


def rsa_decrypt(key: rsa.RSAPrivateKey, ciphertext: bytes, algorithm: Algorithm) -> bytes:
    """The private-key operation; every failure, length included, is the same DecryptionFailed."""
    check_ciphertext_length(ciphertext, key.key_size)
    try:
        return key.decrypt(ciphertext, PADDINGS[algorithm])
    except ValueError:
        raise DecryptionFailed() from None


def pkcs8(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def key_aad(key_id: str) -> bytes:
    """What a sealed private key is bound to: it opens only under the id it was sealed for, in every store."""
    return f"lkm-key:v1:{key_id}".encode()
