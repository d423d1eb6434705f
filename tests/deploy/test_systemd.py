"""deploy/systemd/lkm.service: hardened, and accepted by systemd itself."""

from __future__ import annotations

import configparser

from tests.deploy.common import DEPLOY


def test_systemd_unit_is_hardened() -> None:
    parser = configparser.ConfigParser(strict=False, interpolation=None, empty_lines_in_values=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((DEPLOY / "systemd" / "lkm.service").read_text())
    service = parser["Service"]
    expected = {"User": "lkm", "Type": "exec", "ProtectSystem": "strict", "NoNewPrivileges": "yes",
                "PrivateTmp": "yes", "ProtectHome": "yes", "CapabilityBoundingSet": "",
                "MemoryDenyWriteExecute": "yes", "LimitCORE": "0", "UMask": "0077", "Restart": "on-failure"}
    for key, value in expected.items():
        assert service.get(key) == value, key
    assert set(service["ReadWritePaths"].split()) == {"/var/lib/lkm", "/var/log/lkm"}
    assert service["ExecStart"].endswith("lkm serve -c /etc/lkm/lkm.yaml")
    assert "EnvironmentFile" in service
