"""`lkm keys ...` refusals through the real CLI: each says what was found and what to type next."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lkm import devmode
from tests.conftest import VECTORS
from tests.lkmcli import lkm_here

V0 = "3f0c8c1e-6a55-4a4e-9a0e-2b8f2f1f6d11"
OTHER = "8d6c1f0a-2b3e-4c5d-8e9f-0a1b2c3d4e5f"


@pytest.fixture
def config(tmp_path: Path) -> str:
    return str(devmode.ensure_dev_environment(tmp_path / "dev", port_base=0))


def keys(config: str) -> dict[str, str]:
    return {k["id"]: k["state"] for k in json.loads(lkm_here("keys", "list", "--json", "-c", config).stdout)}


def export(tmp_path: Path) -> Path:
    path = tmp_path / "keypair.json"
    path.write_text(json.dumps([{"id": V0, "private_key": VECTORS["vectors"][0]["private_key_pkcs1_der_b64"]}]))
    return path


@pytest.mark.slow
def test_import_bulk_activate_of_an_id_not_in_the_file_is_refused(config: str, tmp_path: Path) -> None:
    before = keys(config)
    result = lkm_here("keys", "import-bulk", str(export(tmp_path)), "--activate", OTHER, "-c", config, check=False)
    assert result.returncode == 1
    assert f"--activate {OTHER}: no row of " in result.stderr and "nothing was imported" in result.stderr
    assert keys(config) == before


@pytest.mark.slow
def test_import_bulk_activate_of_a_key_already_there_says_nothing_was_activated(config: str,
                                                                                tmp_path: Path) -> None:
    lkm_here("keys", "import-bulk", str(export(tmp_path)), "-c", config)
    result = lkm_here("keys", "import-bulk", str(export(tmp_path)), "--activate", V0, "-c", config, check=False)
    assert result.returncode == 1
    assert f"--activate {V0}: nothing was activated: the key is retired" in result.stderr
    assert keys(config)[V0] == "retired"


@pytest.mark.slow
def test_refusals_say_what_to_type(config: str, tmp_path: Path) -> None:
    active = next(k for k, s in keys(config).items() if s == "active")
    disable = lkm_here("keys", "disable", active, "-c", config, check=False)
    assert disable.returncode == 1 and f"`lkm keys disable {active} --force`" in disable.stderr

    lkm_here("keys", "rotate", "-c", config)
    lkm_here("keys", "disable", active, "-c", config)
    lkm_here("keys", "schedule-destruction", active, "-c", config)
    destroy = lkm_here("keys", "destroy", active, "-c", config, check=False)
    assert destroy.returncode == 1
    line = destroy.stderr.strip()
    assert line.startswith(f"lkm: destruction of {active} refused: the waiting period ends 20")
    assert line.endswith("; run again after that")

    junk = tmp_path / "junk.pem"
    junk.write_text("not a key\n")
    bad = lkm_here("keys", "import", "--id", OTHER, str(junk), "-c", config, check=False)
    assert bad.returncode == 1 and "ValueError" not in bad.stderr
    assert f"{junk}: not a readable private key: expected PEM" in bad.stderr
