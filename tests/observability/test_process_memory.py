"""The benchmarks' per-role memory report names each Ray process by what it serves."""

from __future__ import annotations

import os

from benchmarks.process_memory import by_role, ray_processes, role_of


def test_roles_are_read_from_ray_command_lines() -> None:
    assert role_of("ray::ServeReplica:pdserve:decode") == "serve:decode"
    assert role_of("ray::ServeReplica:pdserve:prefill.initialize_and_get_metadata") == (
        "serve:prefill"
    )
    assert role_of("ray::StageActor.step") == "StageActor"
    assert role_of("ray::IDLE") == "idle worker"
    assert role_of("/venv/lib/python3.11/site-packages/ray/core/src/ray/raylet/raylet --x") == (
        "ray daemons"
    )
    assert role_of("/usr/bin/python3 -m pytest") is None


def test_a_live_process_table_sums_per_role() -> None:
    processes = ray_processes()  # none of Ray may run here; the table must still be well formed
    table = by_role(processes)
    assert sum(row["processes"] for row in table.values()) == len(processes)
    assert all(p.pid != os.getpid() for p in processes)
