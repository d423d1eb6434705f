"""The monitoring files in deploy/ agree with lkm: metric and label names, runbooks; no secret in any file."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from lkm.metrics import Metrics
from tests.deploy.common import DEPLOY

METRIC_RE = re.compile(r"\blkm_[a-zA-Z0-9_]+")
# A metric name followed by a label matcher block: lkm_x{a="b", c=~"d"}
SELECTOR_RE = re.compile(r"\b(lkm_[a-zA-Z0-9_]+)\s*\{([^}]*)\}")
MATCHER_RE = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
            "gauge": ("",), "info": ("_info",), "summary": ("", "_sum", "_count", "_created")}
TARGET_LABELS = {"job", "instance"}


@pytest.fixture(scope="module")
def exposed() -> dict[str, set[str]]:
    """Every series name that Metrics() can expose, with its label names (+ le for histogram buckets)."""
    metrics = Metrics()
    labels_by_family: dict[str, set[str]] = {}
    for collector in vars(metrics).values():
        name = getattr(collector, "_name", None)
        if isinstance(name, str) and hasattr(collector, "_labelnames"):
            labels_by_family[name] = set(collector._labelnames)
    body, _ = metrics.render()
    names: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(body.decode()):
        base = labels_by_family.get(family.name, set())
        for suffix in SUFFIXES[family.type]:
            names[family.name + suffix] = base | ({"le"} if suffix == "_bucket" else set())
    return names


def check_promql(text: str, exposed: dict[str, set[str]], where: str) -> list[str]:
    problems = [f"{where}: unknown metric {name}" for name in METRIC_RE.findall(text) if name not in exposed]
    for name, matchers in SELECTOR_RE.findall(text):
        for label in MATCHER_RE.findall(matchers):
            if name in exposed and label not in exposed[name] | TARGET_LABELS:
                problems.append(f"{where}: {name} has no label {label!r}")
    return problems


def alert_rules() -> list[dict[str, Any]]:
    data = yaml.safe_load((DEPLOY / "prometheus" / "lkm-alerts.yml").read_text())
    return [rule for group in data["groups"] for rule in group["rules"] if "alert" in rule]


# --- metric names ---------------------------------------------------------------------------------------------

def test_exposed_names_include_suffixed_forms(exposed: dict[str, set[str]]) -> None:
    assert "lkm_unwraps_total" in exposed
    assert "lkm_unwrap_duration_seconds_bucket" in exposed
    assert exposed["lkm_unwraps_total"] == {"route", "key_id", "outcome"}
    assert "le" in exposed["lkm_unwrap_duration_seconds_bucket"]
    assert check_promql('rate(lkm_unwraps_total{outcom="ok"}[5m]) + lkm_nope', exposed, "x") == [
        "x: unknown metric lkm_nope", "x: lkm_unwraps_total has no label 'outcom'"]


def test_alert_rules_use_only_exposed_metrics(exposed: dict[str, set[str]]) -> None:
    problems: list[str] = []
    for rule in alert_rules():
        problems += check_promql(rule["expr"], exposed, rule["alert"])
        problems += check_promql(" ".join(rule.get("annotations", {}).values()), exposed, rule["alert"])
    assert not problems, "\n".join(problems)


def test_dashboard_uses_only_exposed_metrics(exposed: dict[str, set[str]]) -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "lkm-dashboard.json").read_text())
    problems: list[str] = []
    exprs = 0
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            exprs += 1
            problems += check_promql(target["expr"], exposed, f"panel {panel['title']!r}")
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            problems += check_promql(query["query"], exposed, f"variable {variable['name']}")
    assert exprs >= 20
    assert not problems, "\n".join(problems)


# --- alert rules ------------------------------------------------------------------------------------------

def test_alert_rules_are_documented_and_labelled() -> None:
    readme = (DEPLOY / "README.md").read_text().lower()
    anchors = {"#" + line[4:].strip().lower() for line in readme.splitlines() if line.startswith("### ")}
    for rule in alert_rules():
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        annotations = rule["annotations"]
        assert annotations["summary"] and annotations["description"], rule["alert"]
        runbook = annotations["runbook"]
        assert runbook.startswith("deploy/README.md#"), rule["alert"]
        assert runbook.removeprefix("deploy/README.md") in anchors, f"{rule['alert']}: no section for {runbook}"


def test_every_alert_has_a_firing_unit_test() -> None:
    tests = yaml.safe_load((DEPLOY / "prometheus" / "lkm-alerts.test.yml").read_text())
    fired = {case["alertname"] for test in tests["tests"] for case in test.get("alert_rule_test", [])
             if case.get("exp_alerts")}
    quiet = {case["alertname"] for test in tests["tests"] for case in test.get("alert_rule_test", [])
             if not case.get("exp_alerts")}
    names = {rule["alert"] for rule in alert_rules()}
    assert names - fired == set()
    assert len(quiet & names) >= 5
    required = {"LkmDown", "LkmNotReady", "LkmUnwrapErrorRatioHigh", "LkmAuthFailuresSpiking",
                "LkmUnwrapLatencyHigh", "LkmActiveKeyOlderThanRotationPeriod", "LkmRotationOverdue",
                "LkmRotationFailing", "LkmPlatformRegistrationFailing", "LkmCertificateExpiringSoon",
                "LkmAuditWriteFailures", "LkmKeystoreDown", "LkmUnwrapVolumeUnusual"}
    assert required <= names


# --- dashboard --------------------------------------------------------------------------------------------

def test_dashboard_shape() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "lkm-dashboard.json").read_text())
    assert 36 <= dashboard["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]


# --- deployment files ---------------------------------------------------------------------------------------

def all_deploy_text() -> dict[Path, str]:
    return {p: p.read_text() for p in DEPLOY.rglob("*") if p.is_file()}


def test_no_key_material_in_deploy_files() -> None:
    for path, text in all_deploy_text().items():
        assert "PRIVATE KEY-----" not in text, path
        assert not re.search(r"^\s*(tls\.key|passphrase|password|pin):\s*\S{16,}", text, re.M), path
