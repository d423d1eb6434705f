"""The `rotation` and `genesys` sections: typed settings, and errors that name the setting."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lkm.config import load_settings
from lkm.errors import ConfigError

SECRET = {"env": "LKM_TEST_GENESYS_SECRET"}


def genesys(**changes: Any) -> dict[str, Any]:
    section: dict[str, Any] = {"region": "usw2.pure.cloud", "client_id": "id", "client_secret": SECRET,
                               "config_id": "cfg"}
    section.update(changes)
    return {k: v for k, v in section.items() if v is not None}


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
    with pytest.raises(ConfigError) as caught:
        load_settings(config_factory(**overrides))
    assert caught.value.setting == setting and expected in caught.value.expected


def test_genesys_urls_must_be_https_off_the_loopback(tmp_path: Path) -> None:
    from lkm.config import settings_from_mapping
    from lkm.errors import ConfigError

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
            with pytest.raises(ConfigError, match="https"):
                settings_from_mapping(data, source="t.yaml", base_dir=tmp_path)
