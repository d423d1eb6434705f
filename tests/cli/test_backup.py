"""`lkm backup create` through the real CLI: an existing bundle is kept unless --force says otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest

from lkm import devmode
from tests.lkmcli import lkm


@pytest.mark.slow
def test_backup_create_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    config = str(devmode.ensure_dev_environment(tmp_path / "dev", port_base=0))
    env = {"LKM_BACKUP_PASSPHRASE": "a backup passphrase of some length"}
    bundle = tmp_path / "bundle.json"
    lkm("backup", "create", str(bundle), "-c", config, env=env)
    first = bundle.read_bytes()
    again = lkm("backup", "create", str(bundle), "-c", config, env=env, check=False)
    assert again.returncode == 1 and f"{bundle} exists; pass --force" in again.stderr
    assert bundle.read_bytes() == first
    lkm("backup", "create", str(bundle), "--force", "-c", config, env=env)
    assert bundle.read_bytes() != first
