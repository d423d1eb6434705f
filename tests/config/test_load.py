"""lkm.config.load: the file to Settings; errors name the file, the setting and what was expected."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from lkm.config import load_settings
from lkm.errors import ConfigError
from tests.lkmcli import lkm_here

LKM = [sys.executable, "-m", "lkm"]
EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "lkm.example.yaml"


def test_bad_yaml_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("keystore:\n  type: file\n platform: [\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert "line" in str(info.value) and str(path) in str(info.value)
    assert (info.value.source, info.value.setting) == (str(path), "(file)")
    assert info.value.expected.startswith("valid YAML at line 3, column ")


def test_unreadable_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert (info.value.source, info.value.setting) == (str(path), "(file)")
    assert info.value.expected == "a readable YAML file (No such file or directory)"


@pytest.mark.parametrize(("text", "setting"), [("[1, 2]\n", "(top level)"), ("keystore: 5\n", "keystore")])
def test_a_mapping_is_expected(tmp_path: Path, text: str, setting: str) -> None:
    path = tmp_path / "lkm.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert (info.value.source, info.value.setting, info.value.expected) == (str(path), setting,
                                                                             "a mapping of settings")


def test_relative_paths_are_relative_to_the_config_file(config_factory: Callable[..., Path]) -> None:
    path = config_factory(**{"keystore.path": "keys-here", "audit.path": "logs/audit.log"})
    settings = load_settings(path)
    assert settings.keystore.path == path.resolve().parent / "keys-here"
    assert settings.audit.path == path.resolve().parent / "logs" / "audit.log"


@pytest.mark.slow
def test_check_config_cli(config_factory: Callable[..., Path]) -> None:
    good = config_factory()
    result = subprocess.run([*LKM, "check-config", "-c", str(good)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "valid" in result.stdout
    data = yaml.safe_load(good.read_text())
    data["native"]["listen"]["prot"] = 1
    good.write_text(yaml.safe_dump(data))
    result = lkm_here("check-config", "-c", str(good), check=False)
    assert result.returncode == 2
    assert f"{good}: native.listen.prot: no such setting" in result.stderr


@pytest.mark.slow
def test_serve_refuses_a_bad_config(config_factory: Callable[..., Path]) -> None:
    path = config_factory(**{"ops.listen.host": 12})
    result = subprocess.run([*LKM, "serve", "-c", str(path)], capture_output=True, text=True, check=False,
                            timeout=60)
    assert result.returncode == 2
    assert f"{path}: ops.listen.host: a non-empty string, got 12" in result.stderr


def test_lkm_config_env(config_factory: Callable[..., Path]) -> None:
    path = config_factory()
    env = {"LKM_CONFIG": str(path), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([*LKM, "check-config"], capture_output=True, text=True, check=False, env=env)
    assert result.returncode == 0, result.stderr


def test_example_config_is_valid_apart_from_missing_files() -> None:
    data = yaml.safe_load(EXAMPLE.read_text())
    assert data["keystore"]["passphrase"] == {"file": "/etc/lkm/secrets/keystore.pass"}
    with pytest.raises(ConfigError) as info:
        load_settings(EXAMPLE)
    # The example points at production paths; what fails is the first missing file, not the shape.
    assert (info.value.source, info.value.setting) == (str(EXAMPLE), "platform.tls.cert_file")
    assert info.value.expected == "an existing file, but /etc/lkm/tls/server.pem does not exist"
