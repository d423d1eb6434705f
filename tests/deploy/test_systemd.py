"""deploy/systemd/: the unit is hardened and accepted by systemd itself; the example config is valid lkm."""

from __future__ import annotations

import configparser
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy.common import DEPLOY, credential_names, tool, validate_lkm_config

UNIT = DEPLOY / "systemd" / "lkm.service"
EXAMPLE = DEPLOY / "systemd" / "lkm.yaml"
VENV_LKM = Path(sys.executable).parent / "lkm"


def service_section() -> configparser.SectionProxy:
    parser = configparser.ConfigParser(strict=False, interpolation=None, empty_lines_in_values=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    return parser["Service"]


def unit_lines(key: str, *, commented: bool = False) -> list[str]:
    """Every value of a key, repeated keys included (configparser keeps only the last one)."""
    prefix = "#?" if commented else ""
    return re.findall(rf"^{prefix}{key}=(.*)$", UNIT.read_text(), re.M)


def test_systemd_unit_is_hardened() -> None:
    service = service_section()
    expected = {"User": "lkm", "Type": "notify", "NotifyAccess": "main", "ProtectSystem": "strict",
                "NoNewPrivileges": "yes", "PrivateTmp": "yes", "ProtectHome": "yes", "CapabilityBoundingSet": "",
                "MemoryDenyWriteExecute": "yes", "LimitCORE": "0", "LimitNOFILE": "65536", "UMask": "0077",
                "Restart": "on-failure", "ExecReload": "/bin/kill -HUP $MAINPID", "WatchdogSec": "30s"}
    for key, value in expected.items():
        assert service.get(key) == value, key
    assert set(service["ReadWritePaths"].split()) == {"/var/lib/lkm", "/var/log/lkm"}
    assert service["ExecStart"].endswith("lkm serve -c /etc/lkm/lkm.yaml")
    # Secrets come as credentials, not through the environment (readable in /proc by the same user).
    assert "EnvironmentFile" not in service
    assert "Environment" not in service
    # AF_UNIX stays allowed: NOTIFY_SOCKET is a Unix datagram socket.
    assert "AF_UNIX" in service["RestrictAddressFamilies"].split()


def test_credentials_cover_the_example_config() -> None:
    """Every {credential: NAME} the example config (and the README's variants) uses has a LoadCredential."""
    loaded = {line.split(":", 1)[0] for line in unit_lines("LoadCredential", commented=True)}
    active = {line.split(":", 1)[0] for line in unit_lines("LoadCredential")}
    assert active == {"keystore-passphrase"}
    assert {"hsm-pin", "database-dsn", "genesys-client-secret"} <= loaded
    used = credential_names(EXAMPLE.read_text())
    assert "keystore-passphrase" in used
    assert used <= loaded
    for line in unit_lines("LoadCredential", commented=True):
        name, source = line.split(":", 1)
        assert source == f"/etc/lkm/credentials/{name}", line
    readme = (DEPLOY / "README.md").read_text()
    assert credential_names(readme) <= loaded


def test_example_config_is_a_valid_lkm_config(tmp_path: Path) -> None:
    settings = validate_lkm_config(EXAMPLE.read_text(), tmp_path, "deploy/systemd/lkm.yaml")
    assert settings.keystore.passphrase is not None
    assert settings.keystore.passphrase.read_text() == "placeholder"
    assert settings.ops.listen.host == "127.0.0.1"
    # What a reload must re-read stays a plain file, since systemd loads credentials at start only.
    assert settings.platform is not None
    assert str(settings.platform.tls.key_file).endswith("/etc/lkm/secrets/platform.key")


@pytest.fixture(scope="module")
def systemd_analyze() -> str:
    return tool("systemd-analyze", "apt-get install systemd")


def verify(systemd_analyze: str, unit_text: str, directory: Path) -> subprocess.CompletedProcess[str]:
    unit = directory / "lkm.service"
    unit.write_text(unit_text)
    return subprocess.run([systemd_analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True,
                          timeout=120, check=False, cwd=directory)


def with_venv(text: str) -> str:
    return text.replace("ExecStart=/opt/lkm/bin/lkm ", f"ExecStart={VENV_LKM} ")


def test_systemd_analyze_verify(systemd_analyze: str, tmp_path: Path) -> None:
    """systemd's own parser: every key known, every value parsed, the binaries present. Warnings fail too."""
    assert VENV_LKM.is_file()
    text = with_venv(UNIT.read_text())
    assert str(VENV_LKM) in text
    result = verify(systemd_analyze, text, tmp_path)
    assert result.returncode == 0 and result.stderr.strip() == "", result.stdout + result.stderr


@pytest.mark.parametrize(("change", "complaint"), [
    (("Type=notify\n", "Type=notfy\n"), "Failed to parse service type"),
    (("LimitNOFILE=65536\n", "LimitNOFILE=65536\nLoadCredentials=x:/y\n"), "Unknown key"),
    (("ExecStart=", "ExecStart=/nonexistent"), "is not executable"),
], ids=["bad-value", "unknown-key", "missing-binary"])
def test_systemd_analyze_verify_catches_mistakes(systemd_analyze: str, tmp_path: Path,
                                                 change: tuple[str, str], complaint: str) -> None:
    text = with_venv(UNIT.read_text())
    assert change[0] in text
    result = verify(systemd_analyze, text.replace(change[0], change[1], 1), tmp_path)
    assert complaint in result.stderr, result.stderr


def test_systemd_analyze_security(systemd_analyze: str, tmp_path: Path) -> None:
    unit = tmp_path / "lkm.service"
    unit.write_text(with_venv(UNIT.read_text()))
    result = subprocess.run([systemd_analyze, "security", "--offline=yes", "--no-pager", str(unit)],
                            capture_output=True, text=True, timeout=120, check=False, cwd=tmp_path)
    match = re.search(r"Overall exposure level for lkm\.service: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 2.0, result.stdout
