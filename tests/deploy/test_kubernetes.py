"""deploy/kubernetes/: the manifests keep to lkm's conventions and carry a valid lkm configuration."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from lkm.config import settings_from_mapping
from tests.deploy.common import DEPLOY


def kubernetes_objects() -> dict[str, dict[str, Any]]:
    objects: dict[str, dict[str, Any]] = {}
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") != "Kustomization":
                objects[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return objects


def test_kubernetes_statefulset() -> None:
    objects = kubernetes_objects()
    assert {"StatefulSet/lkm", "Service/lkm", "ConfigMap/lkm-config", "PodDisruptionBudget/lkm"} <= set(objects)
    sts = objects["StatefulSet/lkm"]["spec"]
    assert sts["replicas"] == 1
    pod = sts["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"platform": 8443, "native": 8444, "ops": 9090}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "ops"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "ops"}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["data"] == "/var/lib/lkm"
    assert sts["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    secrets = [v for v in pod["volumes"] if "secret" in v]
    assert len(secrets) >= 3
    for volume in secrets:
        assert volume["secret"]["defaultMode"] == 0o400, volume["name"]
        assert mounts[volume["name"]].startswith("/etc/lkm/secrets/"), volume["name"]
    annotations = sts["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "9090"
    service_ports = {p["port"] for p in objects["Service/lkm"]["spec"]["ports"]}
    assert service_ports == {8443, 8444}


def test_kubernetes_config_is_a_valid_lkm_config(tmp_path: Path) -> None:
    """The ConfigMap's lkm.yaml passes lkm's own validation, with its files re-rooted in a temporary dir."""
    text = kubernetes_objects()["ConfigMap/lkm-config"]["data"]["lkm.yaml"]
    data = yaml.safe_load(text)
    paths = set(re.findall(r"(/etc/lkm/[^\s},]+|/var/lib/lkm[^\s},]*)", text))
    assert any(p.startswith("/etc/lkm/secrets/") for p in paths)
    for path in paths:
        assert path.startswith(("/etc/lkm/secrets/", "/var/lib/lkm")), path

    def reroot(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: reroot(v) for k, v in value.items()}
        if isinstance(value, list):
            return [reroot(v) for v in value]
        if isinstance(value, str) and value.startswith(("/etc/lkm/", "/var/lib/lkm")):
            return str(tmp_path / value.lstrip("/"))
        return value

    for path in paths:
        if path.startswith("/etc/lkm/secrets/"):
            target = tmp_path / path.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text("placeholder\n")
    settings = settings_from_mapping(reroot(data), source="configmap lkm.yaml", base_dir=tmp_path)
    assert settings.keystore.path == tmp_path / "var/lib/lkm/keystore"
    assert settings.ops.listen.port == 9090
    assert settings.audit.path == tmp_path / "var/lib/lkm/audit.log"
