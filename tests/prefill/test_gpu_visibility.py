"""GPU actors see every GPU of their node and drive the one Ray assigned them.

Real Ray with simulated GPUs (no CUDA here): what Ray hands the actor is checked, and the
index mapping is checked for the layouts a node can have (IDs, a narrowed list, UUIDs).
"""

from __future__ import annotations

import os

import pytest
import ray

from cluster.gpu_visibility import NOSET_VISIBLE_DEVICES, all_gpus_visible_runtime_env, cuda_index


@pytest.mark.parametrize(
    ("assigned", "visible", "index"),
    [
        ([], None, None),
        ([1], None, 1),  # Ray left the variable alone and the node sets none: IDs are indices
        (["3"], "3", 0),  # Ray narrowed it to the actor's GPU
        (["6"], "4,5,6,7", 2),  # all visible, the node (a pod) exposes GPUs 4-7
        (["GPU-b2"], "GPU-a1,GPU-b2", 1),  # UUIDs
        ([3, 2], "0,1,2,3", 2),  # several GPUs: the lowest drives the process
    ],
)
def test_cuda_index(assigned: list, visible: str | None, index: int | None) -> None:
    assert cuda_index(assigned, visible) == index


def test_assigned_gpu_missing_from_visible_devices_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="not in CUDA_VISIBLE_DEVICES"):
        cuda_index(["5"], "0,1")


@ray.remote(num_cpus=0)
class Probe:
    def seen(self) -> dict:
        return {
            "gpu_ids": [str(i) for i in ray.get_gpu_ids()],
            "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "noset": os.environ.get(NOSET_VISIBLE_DEVICES),
        }


def test_ray_leaves_the_nodes_gpus_visible_to_pdserve_actors(ray_cluster) -> None:
    narrowed = Probe.options(num_gpus=1).remote()
    opened = Probe.options(num_gpus=1, runtime_env=all_gpus_visible_runtime_env()).remote()
    try:
        plain, ours = ray.get([narrowed.seen.remote(), opened.seen.remote()], timeout=60)
    finally:
        ray.kill(narrowed)
        ray.kill(opened)
    assert plain["visible"] == plain["gpu_ids"][0]  # Ray's default: only its own GPU
    assert ours["noset"] == "1" and ours["visible"] is None  # the node's view, unnarrowed
    assert len(ours["gpu_ids"]) == 1
    assert cuda_index(plain["gpu_ids"], plain["visible"]) == 0
    assert cuda_index(ours["gpu_ids"], ours["visible"]) == int(ours["gpu_ids"][0])
