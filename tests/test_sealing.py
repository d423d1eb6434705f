"""lkm.sealing: the passphrase derivation and AES-GCM sealing shared by the file store and backups."""

from __future__ import annotations

import json

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from lkm.keys import b64
from lkm.sealing import KEY_BYTES, ScryptParams, open_sealed, seal

CHEAP_N = 2**10  # the stored cost is read back, so tests may use a cheap one


def test_derivation_is_repeatable_from_the_stored_block() -> None:
    params = ScryptParams.fresh(CHEAP_N)
    doc = json.loads(json.dumps(params.to_doc()))
    assert doc == {"name": "scrypt", "salt": b64(params.salt), "n": CHEAP_N, "r": 8, "p": 1}
    key = params.derive(b"passphrase")
    assert len(key) == KEY_BYTES
    assert ScryptParams.from_doc(doc).derive(b"passphrase") == key
    assert ScryptParams.from_doc(doc).derive(b"Passphrase") != key
    assert ScryptParams.fresh(CHEAP_N).derive(b"passphrase") != key  # a fresh salt each time


def test_unknown_or_malformed_derivation_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown key derivation"):
        ScryptParams.from_doc({"name": "pbkdf2", "salt": "AAAA", "n": 1, "r": 1, "p": 1})
    with pytest.raises(KeyError):
        ScryptParams.from_doc({"name": "scrypt", "n": CHEAP_N, "r": 8, "p": 1})


def test_sealed_value_opens_only_with_its_key_and_associated_data() -> None:
    aead = AESGCM(ScryptParams.fresh(CHEAP_N).derive(b"passphrase"))
    sealed = seal(aead, b"secret", b"key-1")
    assert set(sealed) == {"nonce", "ciphertext"} and b"secret" not in json.dumps(sealed).encode()
    assert open_sealed(aead, sealed, b"key-1") == b"secret"
    assert seal(aead, b"secret", b"key-1") != sealed  # a fresh nonce each time
    with pytest.raises(InvalidTag):
        open_sealed(aead, sealed, b"key-2")
    with pytest.raises(InvalidTag):
        open_sealed(AESGCM(bytes(KEY_BYTES)), sealed, b"key-1")
