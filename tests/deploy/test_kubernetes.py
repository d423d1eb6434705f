"""deploy/kubernetes/: both overlays render with kustomize, validate against the Kubernetes schema, refer only
to ports, paths, selectors and Secret keys that exist, and carry a valid lkm configuration."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.deploy.common import DEPLOY, tool, validate_lkm_config

K8S = DEPLOY / "kubernetes"
OVERLAYS = ["file-store", "ha-postgresql"]
SCHEMA_VERSIONS = ["1.32.0", kubernetes_validate.latest_version()]
Objects = dict[str, dict[str, Any]]


@pytest.fixture(scope="module")
def kubectl() -> str:
    return tool("kubectl", "the kubectl package; `kubectl kustomize` is built in")


def kustomize(kubectl: str, directory: Path) -> Objects:
    result = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 0, result.stderr
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in yaml.safe_load_all(result.stdout) if d}


@pytest.fixture(scope="module")
def rendered(kubectl: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Objects]:
    """Each overlay as kubectl would apply it, plus the HA overlay with the ServiceMonitor component."""
    out = {name: kustomize(kubectl, K8S / "overlays" / name) for name in OVERLAYS}
    wrapper = tmp_path_factory.mktemp("servicemonitor")
    rel = os.path.relpath(K8S, wrapper)  # kustomize refuses absolute paths
    (wrapper / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "namespace": "lkm",
        "resources": [f"{rel}/overlays/ha-postgresql"], "components": [f"{rel}/components/servicemonitor"]}))
    out["ha-postgresql+servicemonitor"] = kustomize(kubectl, wrapper)
    return out


def workload(objects: Objects) -> dict[str, Any]:
    (found,) = [o for o in objects.values() if o["kind"] in {"StatefulSet", "Deployment"}]
    return found


def container(objects: Objects) -> dict[str, Any]:
    (only,) = workload(objects)["spec"]["template"]["spec"]["containers"]
    return only


def readme_secrets() -> dict[str, set[str]]:
    """The Secrets deploy/README.md tells the operator to create, with their keys."""
    secrets: dict[str, set[str]] = {}
    readme = (DEPLOY / "README.md").read_text()
    for kind, name, args in re.findall(r"create secret (tls|generic) (\S+) ([^\n#]*)", readme):
        keys = {"tls.crt", "tls.key"} if kind == "tls" else set(re.findall(r"--from-file=([^=\s]+)=", args))
        secrets[name] = keys
    return secrets


@pytest.mark.slow
@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
def test_manifests_validate_against_the_kubernetes_schema(rendered: dict[str, Objects], version: str) -> None:
    for overlay, objects in rendered.items():
        for key, obj in objects.items():
            if obj["apiVersion"].startswith("monitoring.coreos.com/"):
                continue  # a CRD: no schema in the Kubernetes release; cross-checked below
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{overlay}: {key} invalid for Kubernetes {version}: {exc.message} at {list(exc.path)}")


def test_the_validator_rejects_a_mistake() -> None:
    bad = {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": {"name": "x"},
           "spec": {"minAvailabel": 2, "selector": {"matchLabels": {"a": "b"}}}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, SCHEMA_VERSIONS[0], strict=True)


@pytest.mark.parametrize("overlay", [*OVERLAYS, "ha-postgresql+servicemonitor"])
def test_every_reference_exists(rendered: dict[str, Objects], overlay: str) -> None:
    objects = rendered[overlay]
    assert {o["metadata"].get("namespace") for o in objects.values() if o["kind"] != "Namespace"} == {"lkm"}
    work = workload(objects)
    pod = work["spec"]["template"]
    labels = pod["metadata"]["labels"]
    spec = pod["spec"]
    main = container(objects)
    ports = {p["name"]: p["containerPort"] for p in main["ports"]}
    assert ports == {"platform": 8443, "native": 8444, "ops": 9090}

    def selects(selector: dict[str, str]) -> bool:
        return bool(selector) and all(labels.get(k) == v for k, v in selector.items())

    assert selects(work["spec"]["selector"]["matchLabels"])
    for key, obj in objects.items():
        if obj["kind"] == "Service":
            assert selects(obj["spec"]["selector"]), key
            for port in obj["spec"]["ports"]:
                assert port["targetPort"] in ports and ports[port["targetPort"]] == port["port"], key
        if obj["kind"] in {"PodDisruptionBudget", "NetworkPolicy"}:
            selector = obj["spec"]["selector" if obj["kind"] == "PodDisruptionBudget" else "podSelector"]
            assert selects(selector["matchLabels"]), key
        if obj["kind"] == "NetworkPolicy":
            allowed = {p["port"] for rule in obj["spec"]["ingress"] for p in rule["ports"]}
            assert allowed == set(ports.values()), key
        if obj["kind"] == "ServiceMonitor":
            service = objects["Service/lkm-metrics"]
            assert obj["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
            names = {p["name"] for p in service["spec"]["ports"]}
            for endpoint in obj["spec"]["endpoints"]:
                assert endpoint["port"] in names and endpoint["path"] == "/metrics"
            assert obj["spec"]["jobLabel"] in service["metadata"]["labels"]
            assert service["metadata"]["labels"][obj["spec"]["jobLabel"]] == "lkm"  # the alerts' job name
    for probe, path in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz"), ("startupProbe", "/healthz")]:
        assert main[probe]["httpGet"] == {"path": path, "port": "ops"}, probe
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(ports["ops"])
    assert annotations["prometheus.io/path"] == "/metrics"

    # Volumes: every mount has a volume, every Secret is one the README creates, with the keys used.
    volumes = {v["name"]: v for v in spec["volumes"]}
    claims = {c["metadata"]["name"] for c in work["spec"].get("volumeClaimTemplates", [])}
    mounts = {m["name"]: m["mountPath"] for m in main["volumeMounts"]}
    assert set(mounts) <= set(volumes) | claims
    documented = readme_secrets()
    secret_dirs: dict[str, set[str]] = {}
    for name, volume in volumes.items():
        if "secret" in volume:
            assert volume["secret"]["defaultMode"] == 0o400, name
            assert volume["secret"]["secretName"] in documented, f"{name}: no `create secret` in the README"
            assert mounts[name].startswith("/etc/lkm/secrets/"), name
            secret_dirs[mounts[name]] = documented[volume["secret"]["secretName"]]
        if "configMap" in volume:
            assert f"ConfigMap/{volume['configMap']['name']}" in objects, name

    # The configuration: every file it names is a key of a mounted Secret; its listeners are the ports.
    text = objects["ConfigMap/lkm-config"]["data"]["lkm.yaml"]
    config = yaml.safe_load(text)
    used = set(re.findall(r"/etc/lkm/secrets/[^\s},]+", yaml.safe_dump(config)))
    assert used
    for path in used:
        directory, key = path.rsplit("/", 1)
        assert key in secret_dirs.get(directory, set()), f"{path}: no Secret key mounted there"
    assert mounts["config"] == "/etc/lkm/lkm.yaml" and main["args"] == ["serve", "-c", "/etc/lkm/lkm.yaml"]
    assert config["platform"]["listen"]["port"] == ports["platform"]
    assert config["native"]["listen"]["port"] == ports["native"]
    assert config["ops"]["listen"]["port"] == ports["ops"]
    assert config["audit"]["path"].startswith(mounts["data"] + "/")


def test_file_store_is_one_statefulset(rendered: dict[str, Objects]) -> None:
    objects = rendered["file-store"]
    sts = objects["StatefulSet/lkm"]["spec"]
    assert sts["replicas"] == 1
    assert objects["PodDisruptionBudget/lkm"]["spec"]["minAvailable"] == 1
    assert sts["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    assert objects[f"Service/{sts['serviceName']}"]["spec"]["clusterIP"] == "None"
    pod = sts["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    sc = container(objects)["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert {p["port"] for p in objects["Service/lkm"]["spec"]["ports"]} == {8443, 8444}


def test_ha_overlay(rendered: dict[str, Objects]) -> None:
    objects = rendered["ha-postgresql"]
    assert "StatefulSet/lkm" not in objects
    deployment = objects["Deployment/lkm"]["spec"]
    assert deployment["replicas"] == 3
    assert deployment["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert objects["PodDisruptionBudget/lkm"]["spec"]["minAvailable"] == 2
    pod = deployment["template"]["spec"]
    spread = {c["topologyKey"]: c for c in pod["topologySpreadConstraints"]}
    assert spread["kubernetes.io/hostname"]["whenUnsatisfiable"] == "DoNotSchedule"
    assert "topology.kubernetes.io/zone" in spread
    for constraint in spread.values():
        assert constraint["labelSelector"]["matchLabels"] == deployment["selector"]["matchLabels"]
    main = container(objects)
    assert main["securityContext"]["readOnlyRootFilesystem"] is True
    requests = main["resources"]["requests"]
    assert requests["cpu"] == "1" and "cpu" not in main["resources"]["limits"]
    config = yaml.safe_load(objects["ConfigMap/lkm-config"]["data"]["lkm.yaml"])
    assert config["keystore"]["type"] == "postgresql"
    assert set(config["keystore"]["dsn"]) == {"file"} and set(config["keystore"]["passphrase"]) == {"file"}
    egress = {p["port"] for rule in objects["NetworkPolicy/lkm"]["spec"]["egress"] for p in rule["ports"]}
    assert {53, 443, 5432} <= egress
    assert 5432 not in {p["port"] for rule in rendered["file-store"]["NetworkPolicy/lkm"]["spec"]["egress"]
                        for p in rule["ports"]}
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_file_store_config_is_a_valid_lkm_config(rendered: dict[str, Objects], tmp_path: Path) -> None:
    text = rendered["file-store"]["ConfigMap/lkm-config"]["data"]["lkm.yaml"]
    settings = validate_lkm_config(text, tmp_path, "file-store lkm.yaml")
    assert settings.keystore.path == tmp_path / "var/lib/lkm/keystore"
    assert settings.ops.listen.port == 9090
    assert settings.audit.path == tmp_path / "var/lib/lkm/audit.log"


def test_ha_config_is_a_valid_lkm_config(rendered: dict[str, Objects], tmp_path: Path) -> None:
    text = rendered["ha-postgresql"]["ConfigMap/lkm-config"]["data"]["lkm.yaml"]
    settings = validate_lkm_config(text, tmp_path, "ha-postgresql lkm.yaml")
    assert settings.keystore.type == "postgresql"
