"""`lkm check-config` through the real CLI: it opens the key store with the secrets the server would use."""

from __future__ import annotations

from pathlib import Path

import pytest

from lkm import devmode
from tests.lkmcli import lkm, lkm_here


@pytest.mark.slow
def test_a_good_config_unwraps_a_test_value(tmp_path: Path) -> None:
    config = devmode.ensure_dev_environment(tmp_path / "dev", port_base=0)
    result = lkm("check-config", "-c", str(config))
    assert "[ok] keystore: file store opened, 1 usable key(s); key " in result.stdout
    assert "unwrapped a test value" in result.stdout and "configuration is valid" in result.stdout


@pytest.mark.slow
def test_a_wrong_passphrase_fails_and_says_which_check(tmp_path: Path) -> None:
    config = devmode.ensure_dev_environment(tmp_path / "dev", port_base=0)
    (config.parent / "keystore.pass").write_text("not the passphrase of this store\n")
    result = lkm_here("check-config", "-c", str(config), check=False)
    assert result.returncode == 1 and "configuration is valid" not in result.stdout
    assert "[FAIL] keystore: wrong passphrase" in result.stdout
    assert result.stderr.strip().endswith(f"{config}: check keystore failed: wrong passphrase for the key store "
                                          f"{config.parent / 'keystore'}")
    offline = lkm_here("check-config", "--offline", "-c", str(config))
    assert "[skipped] keystore: --offline" in offline.stdout
    assert "configuration is valid (key store not checked: --offline)" in offline.stdout


@pytest.mark.slow
def test_a_store_not_made_yet_is_said_and_not_made(tmp_path: Path) -> None:
    config = devmode.ensure_dev_environment(tmp_path / "dev", port_base=0)
    text = config.read_text().replace("path: keystore", "path: fresh-store")
    config.write_text(text)
    result = lkm_here("check-config", "-c", str(config))
    assert "not created yet (the server creates it at first start)" in result.stdout
    assert not (config.parent / "fresh-store").exists()
