"""What the tests of deploy/ share: where the files are, and the tools they run (installed by tests/run)."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from lkm.config import Settings, settings_from_mapping

ROOT = Path(__file__).resolve().parent.parent.parent
DEPLOY = ROOT / "deploy"


def tool(name: str, install: str) -> str:
    """The path of a command-line tool; CI must have it (tests/run installs it), elsewhere the test skips."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is required in CI ({install})")
        pytest.skip(f"{name} not installed ({install}); CI runs these checks")
    return path


CREDENTIAL_DIR = "/run/credentials/lkm.service"


def validate_lkm_config(text: str, tmp_path: Path, source: str) -> Settings:
    """A deployment's lkm.yaml passes lkm's own validation, its absolute paths re-rooted under tmp_path.

    Secret files get placeholder content. A `{credential: NAME}` is read as the file systemd puts it in,
    $CREDENTIALS_DIRECTORY/NAME, so the check holds whichever secret forms the config loader knows.
    """
    data = yaml.safe_load(text)

    def reroot(value: Any) -> Any:
        if isinstance(value, dict):
            if set(value) == {"credential"}:
                return {"file": reroot(f"{CREDENTIAL_DIR}/{value['credential']}")}
            return {k: reroot(v) for k, v in value.items()}
        if isinstance(value, list):
            return [reroot(v) for v in value]
        if isinstance(value, str) and value.startswith(("/etc/lkm/", "/var/lib/lkm/", "/var/log/lkm/", "/run/")):
            target = tmp_path / value.lstrip("/")
            if value.startswith(("/etc/lkm/secrets/", CREDENTIAL_DIR)):
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text("placeholder\n")
            return str(target)
        return value

    rerooted = reroot(data)
    return settings_from_mapping(rerooted, source=source, base_dir=tmp_path)


def credential_names(text: str) -> set[str]:
    """Every `{credential: name}` a text uses (lower case: NAME in upper case is the placeholder in prose)."""
    return set(re.findall(r"\{\s*credential:\s*([a-z0-9][a-z0-9_.-]*)\s*\}", text))
