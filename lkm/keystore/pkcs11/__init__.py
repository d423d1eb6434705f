"""Key store in a PKCS#11 token (an HSM; SoftHSM2 for trials and CI): private keys never leave the token.

On the token, per key: an RSA-3072 private key (sensitive, never extractable, decrypt/unwrap only), its public
key, and a metadata object (`meta`); both keys carry CKA_ID = the key's UUID bytes and CKA_LABEL "lkm:<id>". A
key exists for lkm when its metadata does; the token is the one truth several servers share.

Why worker processes: python-pkcs11 initializes the library without OS locking, so two threads with sessions
can crash SoftHSM2. The server never loads the library; every token call runs in one of `pool_size` spawned
worker processes (`worker`, `entry`), each logged in once with one session, used by one caller at a time
(`pool`). A crash kills a worker, not the server; token failures retire the workers and the next call respawns
them. A refused PIN is never retried. (Scripts opening this store at top level need the `__main__` guard.)

Why some paddings are refused: a start-up probe decrypts on the token and `supported_algorithms()` reports what
worked (SoftHSM2 lacks OAEP-SHA256). RSA-PKCS1-V1_5 errors would be a Bleichenbacher oracle, so it is refused
unless `allow_pkcs1`; then a rejected padding answers HMAC(secret, id + ciphertext) instead (implicit
rejection), the secret being a private data object on the token that every process and replica reads; the
service applies the same rule to a message of the wrong length (platform.pkcs1_data_key_length).
Plaintext import is allowed unless `allow_import` is false; imported keys are stored like generated ones and
marked `extra.imported`.
"""

from __future__ import annotations

from lkm.keystore.pkcs11.protocol import INSTALL_HINT, key_id_bytes, pkcs11_available
from lkm.keystore.pkcs11.store import Pkcs11KeyStore

__all__ = ["INSTALL_HINT", "Pkcs11KeyStore", "key_id_bytes", "pkcs11_available"]
