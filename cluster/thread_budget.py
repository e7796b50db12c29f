"""Each engine process computes on as many threads as the CPUs Ray gave it, no more.

Why: on one machine the prefill stages, the decode replica and the ingress share the cores. A
torch process left alone starts one thread per core, so three engine processes on two cores
would run six compute threads on two cores, and OpenMP threads that spin at barriers while
another process holds their core turn that into steps several times slower. Ray sets
`OMP_NUM_THREADS` from `num_cpus` only where the variable is unset (our `ray up` shells set it
to 1 for every process), so the budget is applied here, explicitly, from the resources Ray
assigned: the floor of the actor's `num_cpus`, at least 1, at most the cores the process may
run on. torch and the native CPU kernels share that one OpenMP pool.
"""

from __future__ import annotations

import logging
import math
import os

log = logging.getLogger(__name__)


def threads_for(num_cpus: float | None, cores: int) -> int:
    """Threads for a process granted `num_cpus` (None: not set) on a machine of `cores`."""
    wanted = 1 if not num_cpus else math.floor(num_cpus)
    return max(1, min(wanted, cores))


def assigned_cpus() -> float | None:
    """The CPUs Ray assigned to this actor or replica, or None outside one (no Ray, or a
    driver, such as a test that builds an engine in its own process)."""
    import ray

    if not ray.is_initialized():
        return None
    context = ray.get_runtime_context()
    if context.worker.mode != ray.WORKER_MODE:
        return None
    return context.get_assigned_resources().get("CPU")


def apply_thread_budget(role: str) -> int | None:
    """Sets torch's intra-op threads (and OpenMP's) for this Ray actor from the CPUs Ray
    assigned it; returns the count. Outside Ray (tests, `pdserve generate`) it changes nothing
    and returns None."""
    import torch

    granted = assigned_cpus()
    if granted is None:
        return None
    threads = threads_for(granted, len(os.sched_getaffinity(0)))
    torch.set_num_threads(threads)
    log.info(
        "compute threads: %d (num_cpus %s, %d cores visible)",
        threads,
        granted,
        len(os.sched_getaffinity(0)),
        extra={"role": role},
    )
    return threads
