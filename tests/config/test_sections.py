"""lkm.config.sections: each section becomes typed settings; errors name the file, the setting, the expectation."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lkm.config import (
    KeyStoreType,
    LogFormat,
    LogLevel,
    PinWorkers,
    ReplayCheck,
    RsaExecution,
    load_settings,
    settings_from_mapping,
)
from lkm.errors import ConfigError

SECRET = {"env": "LKM_TEST_GENESYS_SECRET"}


def genesys(**changes: Any) -> dict[str, Any]:
    section: dict[str, Any] = {"region": "usw2.pure.cloud", "client_id": "id", "client_secret": SECRET,
                               "config_id": "cfg"}
    section.update(changes)
    return {k: v for k, v in section.items() if v is not None}


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
    ({"platform.hawk.replay_check": "everywhere"}, "platform.hawk.replay_check", "one of off, local, cluster"),
    ({"platform.hawk.replay_check": "cluster"}, "platform.hawk.replay_check", "needs keystore.type postgresql"),
    ({"surprise": {"a": 1}}, "surprise", "no such setting"),
    ({"limits.pin_workers": "always"}, "limits.pin_workers", "one of auto, off"),
    ({"platform.pkcs1_data_key_length": 48}, "platform.pkcs1_data_key_length", "<= 32"),
    ({"platform.pkcs1_data_key_length": "on"}, "platform.pkcs1_data_key_length", "an integer"),
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


def test_closed_vocabularies_parse_to_their_enums(config_factory: Callable[..., Path]) -> None:
    settings = load_settings(config_factory(**{"logging.level": "debug", "logging.format": "text"}))
    assert settings.keystore.type is KeyStoreType.FILE
    assert settings.logging.level is LogLevel.DEBUG and settings.logging.format is LogFormat.TEXT


@pytest.mark.parametrize(("written", "meant"), [(None, 32), (16, 16), ("off", None), (False, None)])
def test_pkcs1_data_key_length_is_32_unless_set(config_factory: Callable[..., Path], written: object,
                                                 meant: int | None) -> None:
    overrides = {} if written is None else {"platform.pkcs1_data_key_length": written}
    assert load_settings(config_factory(**overrides)).platform.pkcs1_data_key_length == meant


@pytest.mark.parametrize(("written", "meant"), [(None, ReplayCheck.LOCAL), (True, ReplayCheck.LOCAL),
                                                (False, ReplayCheck.OFF), ("local", ReplayCheck.LOCAL),
                                                ("off", ReplayCheck.OFF)])
def test_replay_check_takes_its_names_and_the_older_true_false(config_factory: Callable[..., Path],
                                                               written: object, meant: ReplayCheck) -> None:
    overrides = {} if written is None else {"platform.hawk.replay_check": written}
    assert load_settings(config_factory(**overrides)).platform.hawk.replay_check is meant


@pytest.mark.parametrize(("written", "meant"), [(None, PinWorkers.AUTO), ("auto", PinWorkers.AUTO),
                                                ("off", PinWorkers.OFF), (False, PinWorkers.OFF),
                                                (True, PinWorkers.AUTO)])
def test_pin_workers_takes_its_names_and_yaml_booleans(config_factory: Callable[..., Path], written: object,
                                                       meant: PinWorkers) -> None:
    overrides = {} if written is None else {"limits.pin_workers": written}
    assert load_settings(config_factory(**overrides)).limits.pin_workers is meant


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


def test_rsa_execution_is_automatic_unless_chosen(config_factory: Callable[..., Path]) -> None:
    assert load_settings(config_factory()).limits.rsa_execution is RsaExecution.AUTO
    chosen = load_settings(config_factory(**{"limits.rsa_execution": "inline"}))
    assert chosen.limits.rsa_execution is RsaExecution.INLINE
    with pytest.raises(ConfigError, match="rsa_execution"):
        load_settings(config_factory(**{"limits.rsa_execution": "sideways"}))


def test_sections_become_typed_settings(config_factory: Callable[..., Path]) -> None:
    settings = load_settings(config_factory(rotation={"every": "30d"}, genesys=genesys(timeout="20s")))
    assert settings.rotation is not None and settings.rotation.every_seconds == 30 * 86400
    g = settings.genesys
    assert g is not None
    assert (g.login_url, g.api_url) == ("https://login.usw2.pure.cloud", "https://api.usw2.pure.cloud")
    assert g.timeout_seconds == 20.0 and g.max_attempts == 6 and g.client_secret.name == "LKM_TEST_GENESYS_SECRET"
    plain = load_settings(config_factory())
    assert plain.rotation is None and plain.genesys is None


@pytest.mark.parametrize(("overrides", "setting", "expected"), [
    ({"rotation": {"every": "30m"}}, "rotation.every", "at least 3600 seconds"),
    ({"rotation": {"every": "monthly"}}, "rotation.every", "a duration such as"),
    ({"rotation": {"every": "1d", "at": "02:00"}}, "rotation.at", "no such setting"),
    ({"genesys": genesys(region=None)}, "genesys.region", "or both login_url and api_url"),
    ({"genesys": genesys(login_url="https://login.example")}, "genesys.region", "not both"),
    ({"genesys": genesys(region="https://api.mypurecloud.com")}, "genesys.region", "a region domain"),
    ({"genesys": genesys(region=None, login_url="https://l.example/x", api_url="https://a.example")},
     "genesys.login_url", "no path"),
    ({"genesys": genesys(client_secret="inline")}, "genesys.client_secret", "not an inline secret"),
    ({"genesys": genesys(config_id=None)}, "genesys.config_id", "required"),
    ({"genesys": genesys(timeout="soon")}, "genesys.timeout", "a number of seconds"),
])
def test_bad_sections_are_refused(config_factory: Callable[..., Path], overrides: dict[str, Any], setting: str,
                                  expected: str) -> None:
    path = config_factory(**overrides)
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert caught.value.source == str(path)
    assert caught.value.setting == setting and expected in caught.value.expected


def test_genesys_urls_must_be_https_off_the_loopback(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s")
    base = {"keystore": {"path": str(tmp_path / "k"), "passphrase": {"file": str(secret)}},
            "platform": {"insecure_plaintext": True, "hawk": {"credentials_file": str(tmp_path / "h.json")}},
            "native": {"enabled": False}}
    for url, ok in (("http://api.example.com", False), ("http://127.0.0.1:8080", True),
                    ("https://api.example.com", True)):
        data = {**base, "genesys": {"login_url": url, "api_url": url, "client_id": "c",
                                    "client_secret": {"file": str(secret)}, "config_id": "x"}}
        if ok:
            settings_from_mapping(data, source="t.yaml", base_dir=tmp_path)
        else:
            with pytest.raises(ConfigError, match="https") as caught:
                settings_from_mapping(data, source="t.yaml", base_dir=tmp_path)
            assert (caught.value.source, caught.value.setting) == ("t.yaml", "genesys.login_url")
            assert caught.value.expected == ("an https:// URL (http only for a loopback test platform), "
                                             f"got {url!r}")
