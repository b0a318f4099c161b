"""deploy/kubernetes/: every manifest valid for a pinned Kubernetes version (kubernetes-validate,
strict: unknown fields are errors), the kustomization complete, and the properties the deployment
relies on: a GPU per bridge, probes on /health, the model downloaded by an init step into the models
volume, a headless Service the proxies find the bridges by, only the proxies reaching the bridges,
disruption budgets, non-root pods, and settings the services really read."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from auth_proxy.config import ProxySettings
from bridge.config import BridgeSettings
from tests.conftest import ROOT

KUBERNETES = "1.33.0"
BASE = ROOT / "deploy" / "kubernetes"


def documents() -> list[tuple[str, dict]]:
    return [(path.name, doc) for path in sorted(BASE.glob("*.yaml")) if path.name != "kustomization.yaml"
            for doc in yaml.safe_load_all(path.read_text()) if doc]


def find(kind: str, name: str) -> dict:
    return next(doc for _, doc in documents() if doc["kind"] == kind and doc["metadata"]["name"] == name)


def pod_labels(deployment: str) -> dict[str, str]:
    return find("Deployment", deployment)["spec"]["template"]["metadata"]["labels"]


@pytest.mark.parametrize("name,doc", documents(), ids=lambda v: v if isinstance(v, str) else v["metadata"]["name"])
def test_each_manifest_is_valid_for_the_pinned_kubernetes(name, doc):
    kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def test_strict_validation_catches_a_misspelt_field():
    doc = find("Deployment", "mvp-bridge")
    broken = yaml.safe_load(yaml.safe_dump(doc))
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"tcpSocket": {"port": 8000}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES, strict=True)


def test_the_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    files = {p.name for p in BASE.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files
    images = {i["name"] for i in kustomization["images"]}
    used = {c["image"] for _, d in documents() if d["kind"] == "Deployment"
            for c in d["spec"]["template"]["spec"]["containers"] + d["spec"]["template"]["spec"].get(
                "initContainers", [])}
    assert used == images == {"mvp-stt/bridge", "mvp-stt/auth"}


def test_bridges_get_a_gpu_probes_and_their_model_before_they_start():
    pod = find("Deployment", "mvp-bridge")["spec"]["template"]["spec"]
    bridge = pod["containers"][0]
    assert bridge["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert bridge["readinessProbe"]["httpGet"]["path"] == "/health"
    ports = {p["name"]: p["containerPort"] for p in bridge["ports"]}
    assert ports == {"http": 8000, "metrics": 8001}
    assert bridge["readinessProbe"]["httpGet"]["port"] == "http"
    # Liveness must not be /health: a model switch or an engine restart is not-ready, not dead.
    assert "httpGet" not in bridge["livenessProbe"]
    init = pod["initContainers"][0]
    assert init["command"][-4:] == ["bridge", "models", "prepare", "$(DEFAULT_MODEL)"]
    config = find("ConfigMap", "mvp-bridge-config")["data"]
    models = {v["name"]: v for v in pod["volumes"]}["models"]
    assert models["persistentVolumeClaim"]["claimName"] == "mvp-models"
    for container in (bridge, init):
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert mounts["models"] == config["MODELS_DIR"]
        assert {e["configMapRef"]["name"] for e in container["envFrom"]} == {"mvp-bridge-config"}
    assert pod["terminationGracePeriodSeconds"] > 30  # the bridge's own grace for requests in flight


def test_the_proxies_find_the_bridges_through_a_headless_service():
    service = find("Service", "mvp-bridge")["spec"]
    assert service["clusterIP"] == "None"
    assert service["selector"].items() <= pod_labels("mvp-bridge").items()
    proxy_config = find("ConfigMap", "mvp-auth-config")["data"]
    port = next(p["port"] for p in service["ports"] if p["name"] == "http")
    assert proxy_config["BRIDGE_URLS"] == f"http://mvp-bridge:{port}"
    proxy = find("Deployment", "mvp-auth")["spec"]["template"]["spec"]["containers"][0]
    assert {"mvp-stt-secrets"} == {e["secretRef"]["name"] for e in proxy["envFrom"] if "secretRef" in e}


def test_only_the_proxies_reach_the_bridges():
    policy = find("NetworkPolicy", "mvp-bridge-from-proxy-only")["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels("mvp-bridge").items()
    assert policy["policyTypes"] == ["Ingress"]
    api = [rule for rule in policy["ingress"] if any(p["port"] == 8000 for p in rule["ports"])]
    assert len(api) == 1 and len(api[0]["from"]) == 1
    source = api[0]["from"][0]
    assert set(source) == {"podSelector"}  # same namespace, proxies only
    assert source["podSelector"]["matchLabels"].items() <= pod_labels("mvp-auth").items()
    assert not source["podSelector"]["matchLabels"].items() <= pod_labels("mvp-bridge").items()


def test_disruption_budgets_cover_both_deployments():
    for name in ("mvp-bridge", "mvp-auth"):
        pdb = find("PodDisruptionBudget", name)["spec"]
        assert pdb["selector"]["matchLabels"].items() <= pod_labels(name).items()
    assert find("PodDisruptionBudget", "mvp-bridge")["spec"]["maxUnavailable"] == 1


def test_every_pod_runs_as_the_images_non_root_user():
    users = {f: int(line.split()[1]) for f in ("Dockerfile.bridge", "Dockerfile.auth")
             for line in (ROOT / f).read_text().splitlines() if line.startswith("USER ")}
    assert set(users.values()) == {10001}
    assert yaml.safe_load((BASE / "namespace.yaml").read_text())["metadata"]["labels"][
        "pod-security.kubernetes.io/enforce"] == "restricted"
    for name in ("mvp-bridge", "mvp-auth"):
        pod = find("Deployment", name)["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        for container in pod["containers"] + pod.get("initContainers", []):
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
            assert sc["readOnlyRootFilesystem"] is True
            assert "/tmp" in {m["mountPath"] for m in container["volumeMounts"]}  # writable scratch space


def test_config_maps_hold_only_settings_the_services_read():
    known = {"bridge": {f.upper() for f in BridgeSettings.model_fields} | {"HF_HOME"},
             "auth": {f.upper() for f in ProxySettings.model_fields}}
    for service in known:
        data = find("ConfigMap", f"mvp-{service}-config")["data"]
        assert set(data) <= known[service], set(data) - known[service]
    assert {"USAGE_DB", "RATE_LIMIT_STORAGE"} <= known["auth"]
    assert Path(BASE / "config.yaml").read_text().count("mvp-stt-secrets") >= 1
