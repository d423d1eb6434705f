"""The Prometheus files in deploy/prometheus/, checked by Prometheus's own promtool (Debian package prometheus)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "prometheus"


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is required in CI (apt-get install prometheus)")
        pytest.skip("promtool not installed (apt-get install prometheus); CI runs these checks")
    return path


@pytest.mark.parametrize("args", [
    ["check", "rules", "lkm-alerts.yml"],
    ["test", "rules", "lkm-alerts.test.yml"],
    ["check", "config", "prometheus.yml"],
], ids=["check-rules", "test-rules", "check-config"])
def test_promtool(promtool: str, args: list[str]) -> None:
    result = subprocess.run([promtool, *args], cwd=DEPLOY, capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 0, f"promtool {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    assert "SUCCESS" in result.stdout
