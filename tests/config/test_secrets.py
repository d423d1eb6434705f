"""lkm.config.secrets: secrets are read where they live, when needed; a missing one names its setting."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from lkm.config import SecretKind, SecretRef
from lkm.errors import ConfigError
from tests.lkmcli import lkm_here

LKM = [sys.executable, "-m", "lkm"]


def ref(kind: SecretKind, name: str) -> SecretRef:
    return SecretRef(kind=kind, name=name, setting="keystore.passphrase", source="lkm.yaml")


def test_a_file_secret_loses_only_its_line_end(tmp_path: Path) -> None:
    path = tmp_path / "pass"
    path.write_bytes(b" two words \r\n")
    assert ref(SecretKind.FILE, str(path)).read_bytes() == b" two words "
    assert ref(SecretKind.FILE, str(path)).read_text() == " two words "


def test_an_env_secret_is_read_as_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LKM_TEST_SECRET", "s\u00e9cret")
    assert ref(SecretKind.ENV, "LKM_TEST_SECRET").read_bytes() == "s\u00e9cret".encode()


def test_a_missing_file_names_file_setting_and_path(tmp_path: Path) -> None:
    path = tmp_path / "absent"
    with pytest.raises(ConfigError) as info:
        ref(SecretKind.FILE, str(path)).read_bytes()
    assert (info.value.source, info.value.setting) == ("lkm.yaml", "keystore.passphrase")
    assert info.value.expected == f"a readable secret file at {path} (No such file or directory)"


def test_a_missing_variable_names_file_setting_and_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LKM_TEST_UNSET_VARIABLE", raising=False)
    with pytest.raises(ConfigError) as info:
        ref(SecretKind.ENV, "LKM_TEST_UNSET_VARIABLE").read_bytes()
    assert (info.value.source, info.value.setting) == ("lkm.yaml", "keystore.passphrase")
    assert info.value.expected == "environment variable LKM_TEST_UNSET_VARIABLE to be set"


def test_missing_secret_env_is_reported_at_check(config_factory: Callable[..., Path]) -> None:
    path = config_factory(**{"keystore.passphrase": {"env": "LKM_TEST_UNSET_VARIABLE"}})
    result = lkm_here("check-config", "-c", str(path), check=False, drop_env=("LKM_TEST_UNSET_VARIABLE",))
    assert result.returncode == 2
    assert (f"{path}: keystore.passphrase: environment variable LKM_TEST_UNSET_VARIABLE to be set"
            in result.stderr)


def test_a_credential_is_read_from_the_credentials_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "keystore.pass").write_bytes(b"from systemd\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert ref(SecretKind.CREDENTIAL, "keystore.pass").read_bytes() == b"from systemd"


def test_a_credential_without_the_directory_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    with pytest.raises(ConfigError) as info:
        ref(SecretKind.CREDENTIAL, "keystore.pass").read_bytes()
    assert (info.value.source, info.value.setting) == ("lkm.yaml", "keystore.passphrase")
    assert info.value.expected == ("environment variable CREDENTIALS_DIRECTORY to be set (systemd sets it for "
                                   "LoadCredential=) to read credential keystore.pass")


def test_a_missing_credential_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    with pytest.raises(ConfigError) as info:
        ref(SecretKind.CREDENTIAL, "absent").read_bytes()
    assert (info.value.source, info.value.setting) == ("lkm.yaml", "keystore.passphrase")
    assert info.value.expected == f"a readable credential file at {tmp_path / 'absent'} (No such file or directory)"


@pytest.mark.slow
def test_check_config_reads_a_credential(tmp_path: Path, config_factory: Callable[..., Path]) -> None:
    path = config_factory(**{"keystore.passphrase": {"credential": "keystore.pass"}})
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "CREDENTIALS_DIRECTORY"}
    result = subprocess.run([*LKM, "check-config", "-c", str(path)], capture_output=True, text=True, check=False,
                            env=env)
    assert result.returncode == 2
    assert f"{path}: keystore.passphrase: environment variable CREDENTIALS_DIRECTORY to be set" in result.stderr
    within = {"CREDENTIALS_DIRECTORY": str(credentials)}  # the same command, in-process from here on
    result = lkm_here("check-config", "-c", str(path), check=False, env=within)
    assert result.returncode == 2
    assert f"a readable credential file at {credentials / 'keystore.pass'}" in result.stderr
    (credentials / "keystore.pass").write_text("correct horse battery staple\n")
    result = lkm_here("check-config", "-c", str(path), check=False, env=within)
    assert result.returncode == 0, result.stderr
