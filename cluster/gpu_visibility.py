"""Which GPU a pdserve actor drives, with every GPU of its node left visible to it.

Ray narrows `CUDA_VISIBLE_DEVICES` to an actor's own GPUs. The same-node KV fast path
(`transport/cuda_ipc/`) maps the decode replica's GPU memory into a prefill stage's process,
which CUDA allows only where that GPU is visible. So pdserve starts its GPU actors with Ray's
opt-out and makes the GPU Ray assigned the actor its current device; the index maps the same way
whether or not Ray narrowed the variable.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

log = logging.getLogger(__name__)

NOSET_VISIBLE_DEVICES = "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"


def all_gpus_visible_runtime_env() -> dict[str, Any]:
    """`runtime_env` for a GPU actor: Ray leaves `CUDA_VISIBLE_DEVICES` as the node has it."""
    return {"env_vars": {NOSET_VISIBLE_DEVICES: "1"}}


def cuda_index(assigned: Sequence[str | int], visible: str | None) -> int | None:
    """The torch device index of the first GPU Ray assigned, given this process's
    `CUDA_VISIBLE_DEVICES` (IDs or UUIDs, as Ray reports them); None without a GPU."""
    if not assigned:
        return None
    first = str(min(assigned, key=lambda i: (len(str(i)), str(i))))
    if not visible:
        return int(first)
    ids = [v.strip() for v in visible.split(",") if v.strip()]
    if first not in ids:
        raise RuntimeError(f"GPU {first} assigned by Ray is not in CUDA_VISIBLE_DEVICES={visible}")
    return ids.index(first)


def actor_device(device: str) -> str:
    """`device` as configured, except `auto` in a Ray actor holding a GPU: that GPU, made the
    process's current CUDA device (streams, IPC and the allocator all default to it).
    Imports torch here: the deployments that use the rest of this module hold no model."""
    import torch

    if device != "auto" or not torch.cuda.is_available():
        return device
    import ray

    if not ray.is_initialized():
        return device
    index = cuda_index(ray.get_gpu_ids(), os.environ.get("CUDA_VISIBLE_DEVICES"))
    if index is None:
        return device
    torch.cuda.set_device(index)
    log.info("actor drives cuda:%d", index, extra={"gpu_ids": ray.get_gpu_ids()})
    return f"cuda:{index}"
