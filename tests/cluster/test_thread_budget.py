"""Engine processes take their compute threads from the CPUs Ray gave them, and leave torch
alone where Ray gave them nothing (outside Ray, or in a driver)."""

from __future__ import annotations

import os

import ray
import torch

from cluster.thread_budget import apply_thread_budget, threads_for


def test_threads_are_the_floor_of_the_cpus_within_the_cores() -> None:
    assert threads_for(None, 8) == 1
    assert threads_for(0.5, 8) == 1
    assert threads_for(2.7, 8) == 2
    assert threads_for(16, 4) == 4


def test_a_driver_with_ray_running_keeps_its_threads() -> None:
    before = torch.get_num_threads()
    ray.init(address="local", num_cpus=1, include_dashboard=False)
    try:
        assert apply_thread_budget("test") is None
    finally:
        ray.shutdown()
    assert torch.get_num_threads() == before


def test_an_actor_computes_on_its_granted_cpus() -> None:
    @ray.remote(num_cpus=2)
    class Engine:
        def threads(self) -> tuple[int | None, int]:
            return apply_thread_budget("test"), torch.get_num_threads()

    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        applied, threads = ray.get(Engine.remote().threads.remote())
    finally:
        ray.shutdown()
    assert applied == threads == min(2, len(os.sched_getaffinity(0)))
