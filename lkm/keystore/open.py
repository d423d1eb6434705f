"""Chooses and opens the configured key-store backend."""

from __future__ import annotations

from lkm.config import KeyStoreSettings
from lkm.keystore import KeyStore


def open_keystore(settings: KeyStoreSettings) -> KeyStore:
    if settings.type == "pkcs11":
        from lkm.keystore.pkcs11 import Pkcs11KeyStore  # noqa: PLC0415 - optional extra, loaded on demand

        store: KeyStore = Pkcs11KeyStore.from_settings(settings)
        return store
    if settings.type == "postgresql":
        from lkm.keystore.postgresql import PostgresKeyStore  # noqa: PLC0415 - optional extra, loaded on demand

        assert settings.dsn is not None and settings.passphrase is not None
        return PostgresKeyStore(settings.dsn.read_text(), settings.passphrase.read_bytes(),
                                pool_min=settings.pool_min, pool_max=settings.pool_max,
                                connect_timeout=settings.connect_timeout)
    from lkm.keystore.file import FileKeyStore  # noqa: PLC0415

    assert settings.path is not None and settings.passphrase is not None
    return FileKeyStore(settings.path, settings.passphrase.read_bytes())
