"""lkm.config.settings: what a loaded configuration looks like to the rest of lkm."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from lkm.config import load_settings
from lkm.roles import Role


def test_valid_config_loads_frozen(config_factory: Callable[..., Path]) -> None:
    settings = load_settings(config_factory())
    assert settings.keystore.type == "file"
    assert settings.platform.path == "/key-management/v1/decrypt"
    assert settings.platform.hawk.timestamp_skew_seconds == 300
    assert settings.native is not None and Role.ADMIN in settings.native.clients[0].roles
    with pytest.raises(AttributeError):
        settings.platform.path = "/x"  # type: ignore[misc]
