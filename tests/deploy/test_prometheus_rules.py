"""The Prometheus files in deploy/prometheus/, checked by Prometheus's own promtool (Debian package prometheus)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy.common import ROOT, tool

DEPLOY = ROOT / "deploy" / "prometheus"
# promtool is a Go program: on one thread, with a lazier collector, its rule tests take a third less CPU and the
# same time (what it checks does not depend on either).
PROMTOOL_ENV = {**os.environ, "GOMAXPROCS": "1", "GOGC": "400"}


@pytest.fixture(scope="module")
def promtool() -> str:
    return tool("promtool", "apt-get install prometheus")


@pytest.mark.parametrize("args", [
    ["check", "rules", "lkm-alerts.yml"],
    ["test", "rules", "lkm-alerts.test.yml"],
    ["check", "config", "prometheus.yml"],
], ids=["check-rules", "test-rules", "check-config"])
@pytest.mark.slow
def test_promtool(promtool: str, args: list[str]) -> None:
    result = subprocess.run([promtool, *args], cwd=DEPLOY, capture_output=True, text=True, timeout=120,
                            check=False, env=PROMTOOL_ENV)
    assert result.returncode == 0, f"promtool {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    assert "SUCCESS" in result.stdout


def test_dashboard_queries_parse(promtool: str, tmp_path: Path) -> None:
    """Every dashboard query is valid PromQL: promtool checks them as recording rules."""
    dashboard = json.loads((DEPLOY.parent / "grafana" / "lkm-dashboard.json").read_text())
    rules = []
    for panel in dashboard["panels"]:
        for i, target in enumerate(panel.get("targets", [])):
            expr = (target["expr"].replace("$__rate_interval", "5m")
                    .replace("$job", ".*").replace("$instance", ".*"))
            rules.append({"record": f"dashboard:panel{panel['id']}_{i}", "expr": expr})
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True,
                            timeout=60, check=False, env=PROMTOOL_ENV)
    assert result.returncode == 0, result.stdout + result.stderr
