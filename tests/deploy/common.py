"""What the tests of deploy/ share: where the files are, and the tools they run (installed by tests/run)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

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
