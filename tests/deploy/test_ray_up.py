"""The `ray up` configs: Ray's own schema and checks, and the Serve app they deploy."""

from __future__ import annotations

import copy
import json
import re
import subprocess
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


def test_every_cluster_is_there() -> None:
    names = [p.name for p in CONFIGS]
    assert names == ["pdserve-aws.yaml", "pdserve-local.yaml", "pdserve-onprem.yaml"]


def node_commands(config: dict) -> dict[str, list[str]]:
    return {
        key: config[key]
        for key in ("setup_commands", "head_start_ray_commands", "worker_start_ray_commands")
    }


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_command_is_node_sh(path: Path) -> None:
    """One source for setup and start: the launch test's path is every config's path."""
    commands = node_commands(load(path))
    for key, sub in (
        ("setup_commands", "setup"),
        ("head_start_ray_commands", "start-head"),
        ("worker_start_ray_commands", "start-worker"),
    ):
        (line,) = commands[key]
        assert line.startswith(f"bash ~/pdserve/cluster/ray_up/node.sh {sub}"), line
    assert "--ray-auth-mode " in commands["setup_commands"][0]  # set on purpose, never inherited


def test_node_sh_is_valid_bash() -> None:
    subprocess.run(["bash", "-n", str(RAY_UP / "node.sh")], check=True)


def test_local_config_differs_from_onprem_only_where_a_cpu_machine_must() -> None:
    local, onprem = load(RAY_UP / "pdserve-local.yaml"), load(RAY_UP / "pdserve-onprem.yaml")
    assert local["provider"] == {"type": "local", "head_ip": "127.0.0.1", "worker_ips": []}
    for key in ("cluster_name", "provider", "auth"):
        local.pop(key), onprem.pop(key)
    swaps = [
        ("--extra mooncake-cpu --torch torch==2.13.0", "--extra mooncake-cuda"),
        ("serve_config_local.yaml --num-gpus=4", "serve_config.yaml --num-gpus=0"),
    ]
    text = yaml.safe_dump(local, width=10_000)
    for cpu, gpu in swaps:
        assert cpu in text
        text = text.replace(cpu, gpu)
    assert yaml.safe_load(text) == onprem


def test_local_serve_config_differs_only_in_placement_and_cpus_and_fits_two_cores() -> None:
    (shipped,) = load(RAY_UP / "serve_config.yaml")["applications"]
    (local,) = load(RAY_UP / "serve_config_local.yaml")["applications"]
    allowed = {"placement_strategy", "num_cpus_per_stage", "decode_num_cpus", "ingress_num_cpus"}
    args, shipped_args = local.pop("args"), shipped.pop("args")
    assert local == shipped
    changed = {k for k in args.keys() | shipped_args.keys() if args.get(k) != shipped_args.get(k)}
    assert changed <= allowed, changed
    from deployments.app import AppConfig

    fields = AppConfig.model_fields
    get = lambda name: args.get(name, fields[name].default)  # noqa: E731
    cpus = 0.1 + args["pp_size"] * get("num_cpus_per_stage") + get("decode_num_cpus")
    cpus += get("ingress_num_cpus")
    gpus = args["pp_size"] * get("num_gpus_per_stage") + get("decode_num_gpus")
    assert cpus <= 2 and gpus <= 4  # the head: 2 cores, --num-gpus=4


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
def test_setup_pulls_the_model_the_serve_config_names(
    path: Path, llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = load(path)
    assert config["file_mounts"] == {"~/pdserve": "."}  # the checkout `ray up` runs from
    (start,) = config["head_start_ray_commands"]
    serve_config = REPO / re.search(r"--serve-config (\S+)", start).group(1)
    assert serve_config.exists(), f"{path.name} deploys {serve_config}, which is missing"
    model = check_serve_config(load(serve_config), llama_dir)["model"]
    # Every node pulls the packaged model to the very path the Serve config names.
    from deployments.model_store import model_path

    (setup,) = config["setup_commands"]
    cache = re.search(r"^CACHE=(\S+)$", (RAY_UP / "node.sh").read_text(), re.M).group(1)
    monkeypatch.setenv("PDSERVE_CACHE", cache)
    assert model == str(model_path(re.search(r"--model (\S+)", setup).group(1)))
    assert "libibverbs1" in (RAY_UP / "node.sh").read_text()  # the Mooncake wheel needs it


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
    (head_start,) = config["head_start_ray_commands"]
    assert head_start.endswith("--num-gpus=0")  # node.sh passes it on to `ray start`


def test_mooncake_protocol_and_devices_are_configured_in_the_serve_config() -> None:
    from transport.config import TransportConfig

    transport = load(RAY_UP / "serve_config.yaml")["applications"][0]["args"]["transport"]
    assert {"protocol", "device_names", "hostname"} <= set(transport)
    assert transport["hostname"] == "auto"  # one config, every node advertises its own IP
    TransportConfig.model_validate({**transport, "protocol": "rdma", "device_names": "mlx5_0"})
