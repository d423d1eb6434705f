"""The lifecycle on a PKCS#11 key store (SoftHSM2): the same rules, and a metadata-only backup."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from lkm import backup, lifecycle
from lkm.errors import KeyUnusable
from lkm.keys import Algorithm, KeyState, utcnow
from tests.conftest import OAEP_SHA1, wrap
from tests.hsm import SoftHsmToken


def test_rotation_destruction_and_backup_on_an_hsm(softhsm_token: SoftHsmToken, tmp_path: Path) -> None:
    store = softhsm_token.store()
    try:
        first = lifecycle.create_key(store, registration=False)
        second = lifecycle.rotate(store, registration=False)
        assert {k.id: k.state for k in store.list_keys()} == {first.id: KeyState.RETIRED,
                                                             second.id: KeyState.ACTIVE}
        assert store.decrypt(first.id, wrap(first, b"h" * 32, OAEP_SHA1), Algorithm.RSA_OAEP_SHA1) == b"h" * 32

        t0 = utcnow()
        lifecycle.disable(store, first.id, now=t0)
        lifecycle.schedule_destruction(store, first.id, days=7, now=t0)
        bundle = backup.create_backup(store, tmp_path / "hsm.lkmbackup", b"hsm backup passphrase")
        assert not bundle.private_keys  # private keys never leave the token
        assert backup.read_backup(tmp_path / "hsm.lkmbackup", b"hsm backup passphrase").keys[0].record.id in \
            {first.id, second.id}

        destroyed = lifecycle.destroy(store, first.id, now=t0 + timedelta(days=7, seconds=1))
        assert destroyed.state is KeyState.DESTROYED
        with pytest.raises(KeyUnusable):
            store.decrypt(first.id, wrap(first, b"h" * 32, OAEP_SHA1), Algorithm.RSA_OAEP_SHA1)
    finally:
        store.close()
