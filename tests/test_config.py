"""Configuration: validated once, errors name the file, the setting and what was expected."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from lkm.config import load_settings
from lkm.errors import ConfigError
from lkm.roles import Role

LKM = [sys.executable, "-m", "lkm"]


def test_valid_config_loads_frozen(config_factory: Callable[..., Path]) -> None:
    settings = load_settings(config_factory())
    assert settings.keystore.type == "file"
    assert settings.platform.path == "/key-management/v1/decrypt"
    assert settings.platform.hawk.timestamp_skew_seconds == 300
    assert settings.native is not None and Role.ADMIN in settings.native.clients[0].roles
    with pytest.raises(AttributeError):
        settings.platform.path = "/x"  # type: ignore[misc]


@pytest.mark.parametrize(("overrides", "setting", "expected"), [
    ({"platform.listen.port": "eighty"}, "platform.listen.port", "an integer"),
    ({"platform.listen.port": 70000}, "platform.listen.port", "<= 65535"),
    ({"platform.path": "decrypt"}, "platform.path", "starting with '/'"),
    ({"platform.bogus": 1}, "platform.bogus", "no such setting"),
    ({"keystore.type": "vault"}, "keystore.type", "one of file, pkcs11"),
    ({"keystore.passphrase": "inline-secret"}, "keystore.passphrase", "not an inline secret"),
    ({"keystore.passphrase": {"file": "a", "env": "B"}}, "keystore.passphrase", "exactly one of"),
    ({"native.clients": [{"name": "x", "roles": ["read"]}]}, "native.clients[0].subject", "at least one of"),
    ({"native.clients": [{"name": "x", "subject": "CN=x", "roles": ["root"]}]}, "native.clients[0].roles",
     "roles from read, unwrap, admin"),
    ({"native.clients": [{"name": "x", "fingerprint": "abc", "roles": ["read"]}]},
     "native.clients[0].fingerprint", "64 hex digits"),
    ({"native.tls.client_ca_file": "/nonexistent/ca.pem"}, "native.tls.client_ca_file", "an existing file"),
    ({"platform.hawk.timestamp_skew": "soon"}, "platform.hawk.timestamp_skew", "a duration"),
    ({"platform.hawk.timestamp_skew": "2h"}, "platform.hawk.timestamp_skew", "at most 1h"),
    ({"logging.level": "loud"}, "logging.level", "one of debug"),
    ({"surprise": {"a": 1}}, "surprise", "no such setting"),
])
def test_config_errors_name_file_setting_and_expectation(config_factory: Callable[..., Path],
                                                         overrides: dict[str, object], setting: str,
                                                         expected: str) -> None:
    path = config_factory(**overrides)
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert info.value.source == str(path)
    assert info.value.setting == setting
    assert expected in info.value.expected


def test_bad_yaml_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("keystore:\n  type: file\n platform: [\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert "line" in str(info.value) and str(path) in str(info.value)


def test_missing_secret_env_is_reported_at_check(config_factory: Callable[..., Path]) -> None:
    path = config_factory(**{"keystore.passphrase": {"env": "LKM_TEST_UNSET_VARIABLE"}})
    result = subprocess.run([*LKM, "check-config", "-c", str(path)], capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert "keystore.passphrase" in result.stderr and "LKM_TEST_UNSET_VARIABLE" in result.stderr


def test_check_config_cli(config_factory: Callable[..., Path]) -> None:
    good = config_factory()
    result = subprocess.run([*LKM, "check-config", "-c", str(good)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "valid" in result.stdout
    data = yaml.safe_load(good.read_text())
    data["native"]["listen"]["prot"] = 1
    good.write_text(yaml.safe_dump(data))
    result = subprocess.run([*LKM, "check-config", "-c", str(good)], capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert f"{good}: native.listen.prot: no such setting" in result.stderr


def test_serve_refuses_a_bad_config(config_factory: Callable[..., Path]) -> None:
    path = config_factory(**{"ops.listen.host": 12})
    result = subprocess.run([*LKM, "serve", "-c", str(path)], capture_output=True, text=True, check=False,
                            timeout=60)
    assert result.returncode == 2
    assert "ops.listen.host" in result.stderr and "a non-empty string" in result.stderr


def test_lkm_config_env(config_factory: Callable[..., Path]) -> None:
    path = config_factory()
    env = {"LKM_CONFIG": str(path), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([*LKM, "check-config"], capture_output=True, text=True, check=False, env=env)
    assert result.returncode == 0, result.stderr


def test_example_config_is_valid_apart_from_missing_files() -> None:
    example = Path(__file__).resolve().parent.parent / "config" / "lkm.example.yaml"
    data = yaml.safe_load(example.read_text())
    assert data["keystore"]["passphrase"] == {"file": "/etc/lkm/secrets/keystore.pass"}
    with pytest.raises(ConfigError) as info:
        load_settings(example)
    # The example points at production paths; what fails is the first missing file, not the shape.
    assert "an existing file" in info.value.expected


def test_native_only_server_needs_no_platform_settings(tmp_path: Path, config_factory: Callable[..., Path]) -> None:
    path = config_factory(platform={"enabled": False})
    settings = load_settings(path)
    assert settings.platform.enabled is False and settings.native is not None


def test_worker_threads_default_covers_every_hsm_session(config_factory: Callable[..., Path]) -> None:
    cpus = os.cpu_count() or 2
    assert load_settings(config_factory()).limits.worker_threads == cpus
    hsm = {"type": "pkcs11", "module": sys.executable, "token_label": "lkm", "pin": {"env": "LKM_TEST_PIN"},
           "pool_size": cpus + 6}
    assert load_settings(config_factory(keystore=hsm)).limits.worker_threads == cpus + 6
    pinned = load_settings(config_factory(keystore=hsm, **{"limits.worker_threads": 3}))
    assert pinned.limits.worker_threads == 3  # an explicit setting wins
