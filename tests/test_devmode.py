"""The dev environment: its first key is audited, and its certificate names only the address it binds."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import pytest
from cryptography import x509

from lkm import devmode
from lkm.config import load_settings
from tests.lkmcli import lkm_here


@pytest.mark.slow
def test_first_key_is_audited_and_the_trail_verifies(tmp_path: Path) -> None:
    config = devmode.ensure_dev_environment(tmp_path / "dev", port_base=0)
    active = json.loads(lkm_here("keys", "list", "--json", "-c", str(config)).stdout)[0]["id"]
    records = [json.loads(line) for line in (config.parent / "audit.log").read_text().splitlines()]
    assert [(r["action"], r["key_id"], r["outcome"]) for r in records] == [("create_key", active, "ok")]
    assert "OK, 1 records" in lkm_here("-c", str(config), "audit", "verify").stdout


def test_the_certificate_names_only_the_bound_address(tmp_path: Path) -> None:
    config = devmode.ensure_dev_environment(tmp_path / "dev", port_base=0)
    settings = load_settings(config)
    cert = x509.load_pem_x509_certificate((config.parent / "certs" / "server.pem").read_bytes())
    ips = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.IPAddress)
    bound = {ipaddress.ip_address(settings.platform.listen.host)}
    assert settings.native is not None
    bound.add(ipaddress.ip_address(settings.native.listen.host))
    assert set(ips) == bound
