"""deploy/compose/: the trial stack passes `docker-compose config`, and its parts refer to each other."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.common import DEPLOY, tool

COMPOSE = DEPLOY / "compose"


@pytest.fixture(scope="module")
def docker_compose() -> str:
    return tool("docker-compose", "apt-get install docker-compose")


def compose_config(docker_compose: str, directory: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([docker_compose, "-f", str(directory / "compose.yaml"), "config"], capture_output=True,
                          text=True, timeout=120, check=False, cwd=directory)


@pytest.mark.slow
def test_compose_config(docker_compose: str) -> None:
    result = compose_config(docker_compose, COMPOSE)
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    assert {"postgres", "lkm-1", "lkm-2", "prometheus", "grafana"} <= set(services)


@pytest.mark.slow
def test_compose_config_catches_mistakes(docker_compose: str, tmp_path: Path) -> None:
    shutil.copytree(COMPOSE, tmp_path / "compose")
    path = tmp_path / "compose" / "compose.yaml"
    path.write_text(path.read_text().replace("  read_only: true\n", "  read_onyl: true\n"))
    result = compose_config(docker_compose, path.parent)
    assert result.returncode != 0 and "read_onyl" in result.stderr, result.stderr


def stack() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((COMPOSE / "compose.yaml").read_text())
    return data


def test_replicas_are_locked_down_and_get_every_secret_they_name() -> None:
    data = stack()
    config_text = (COMPOSE / "lkm.yaml").read_text()
    config = yaml.safe_load(config_text)
    assert config["keystore"]["type"] == "postgresql"
    named = set(re.findall(r"/run/secrets/([^\s},]+)", yaml.safe_dump(config)))
    for name in ("lkm-1", "lkm-2"):
        service = data["services"][name]
        assert service["read_only"] is True and service["cap_drop"] == ["ALL"]
        assert service["ulimits"]["core"] == 0
        assert "environment" not in service  # secrets never through the environment
        assert named <= set(service["secrets"]), name
        assert "./lkm.yaml:/etc/lkm/lkm.yaml:ro" in service["volumes"]
        assert service["command"] == ["serve", "-c", "/etc/lkm/lkm.yaml"]
        for port in service["ports"]:
            assert port.startswith("127.0.0.1:"), port
            assert int(port.rsplit(":", 1)[1]) in {config["platform"]["listen"]["port"],
                                                   config["native"]["listen"]["port"]}
    assert set(named) | {"database-password", "grafana-admin"} == set(data["secrets"])
    for secret in data["secrets"].values():
        assert secret["file"].startswith("./secrets/")
    assert (COMPOSE / ".gitignore").read_text().split() == ["secrets/"]


def test_prometheus_scrapes_both_replicas_with_the_alert_rules(tmp_path: Path) -> None:
    promtool = tool("promtool", "apt-get install prometheus")
    data = stack()
    prometheus = yaml.safe_load((COMPOSE / "prometheus.yml").read_text())
    (job,) = prometheus["scrape_configs"]
    assert job["job_name"] == "lkm"  # the alert rules select job="lkm"
    ops_port = yaml.safe_load((COMPOSE / "lkm.yaml").read_text())["ops"]["listen"]["port"]
    assert job["static_configs"][0]["targets"] == [f"lkm-1:{ops_port}", f"lkm-2:{ops_port}"]
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in data["services"]["prometheus"]["volumes"]
                  if v.startswith("."))
    assert mounts["./prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    assert mounts["../prometheus/lkm-alerts.yml"] == "/etc/prometheus/" + prometheus["rule_files"][0]
    # Laid out as the container sees it, promtool loads the config and the rules.
    shutil.copy(COMPOSE / "prometheus.yml", tmp_path / "prometheus.yml")
    shutil.copy(DEPLOY / "prometheus" / "lkm-alerts.yml", tmp_path / prometheus["rule_files"][0])
    result = subprocess.run([promtool, "check", "config", "prometheus.yml"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr


def test_grafana_provisions_the_dashboard_and_data_source() -> None:
    grafana = stack()["services"]["grafana"]
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in grafana["volumes"] if v.startswith("."))
    for source in mounts:
        assert (COMPOSE / source).is_file(), source
    providers = yaml.safe_load((COMPOSE / "grafana" / "dashboards.yaml").read_text())["providers"]
    dashboard_path = mounts["../grafana/lkm-dashboard.json"]
    assert dashboard_path.rsplit("/", 1)[0] == providers[0]["options"]["path"]
    assert mounts["./grafana/dashboards.yaml"].startswith("/etc/grafana/provisioning/dashboards/")
    assert mounts["./grafana/datasource.yaml"].startswith("/etc/grafana/provisioning/datasources/")
    (source,) = yaml.safe_load((COMPOSE / "grafana" / "datasource.yaml").read_text())["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    assert source["isDefault"] is True
