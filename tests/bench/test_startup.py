"""The start-up benchmark's synthetic store: thousands of keys, each a valid sealed key."""

from __future__ import annotations

import os

import pytest

from lkm.bench.startup import grow_file_store
from lkm.config import load_settings
from lkm.keys import PADDINGS, Algorithm, KeyState
from lkm.keystore.file import FileKeyStore
from tests.conftest import Running


@pytest.mark.slow
def test_synthetic_store_holds_valid_keys(running: Running) -> None:
    running.create_key()
    assert grow_file_store(running.config_path, 12, real_keys=1) > 0
    settings = load_settings(running.config_path)
    assert settings.keystore.path is not None and settings.keystore.passphrase is not None
    store = FileKeyStore(settings.keystore.path, settings.keystore.passphrase.read_bytes())
    try:
        keys = store.list_keys()
        assert len(keys) == 12
        assert sum(k.state is KeyState.RETIRED for k in keys) == 11
        for record in keys[:3]:  # sealed under their own ids: each opens and unwraps
            secret = os.urandom(32)
            wrapped = record.public_key.encrypt(secret, PADDINGS[Algorithm.RSA_OAEP_SHA1])
            assert store.decrypt(record.id, wrapped, Algorithm.RSA_OAEP_SHA1) == secret
    finally:
        store.close()
