"""What the multi-GPU figures share (multi_gpu_fast_path.py, multi_gpu_pp.py,
multi_gpu_service.py): how many GPUs a figure needs, the `--same-gpu` plumbing check, and NCCL's
NVLink multicast kept off.

A figure needs its GPUs: with fewer it exits non-zero and says which machine kind to ask for,
rather than reporting a one-GPU number under a multi-GPU name. `--same-gpu` maps every logical
GPU onto cuda:0 so the plumbing (processes, IPC handles, events, Ray placement) runs on a
one-GPU machine; its JSON says `same_gpu: true`, and its figures are not the target's.

The lent multi-GPU machines require NVLink multicast off in NCCL, PyTorch and NVSHMEM (a
program that uses it can take the host's shared GPUs out of service): `multicast_off` sets the
variables before anything starts a process (spawned peers and Ray's workers inherit them).
pdserve itself uses gloo, not NCCL; this is so nothing a library starts can turn it on.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import Any

import torch

MULTICAST_OFF = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


def multicast_off() -> dict[str, str]:
    """Turn NVLink multicast off for this process and every process it starts."""
    os.environ.update(MULTICAST_OFF)
    return dict(MULTICAST_OFF)


def add_same_gpu_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--same-gpu",
        action="store_true",
        help="map every logical GPU onto cuda:0 to check the plumbing on one GPU "
        "(the JSON says same_gpu: true; not the target's figures)",
    )


def machine_kind(gpus: int) -> str:
    """The smallest lent kind (/work/.library/device/KINDS.md) with `gpus` GPUs."""
    for size in (2, 4, 8):
        if gpus <= size:
            return f"nvidia-h100-x{size}"
    return f"a host with {gpus} GPUs"


def logical_gpus(needed: int, same_gpu: bool, figure: str) -> list[int]:
    """The CUDA index of each of the figure's `needed` logical GPUs: 0..needed-1, or all 0 with
    `same_gpu`. Exits non-zero, saying why, when the machine has too few."""
    present = torch.cuda.device_count()
    if present < 1:
        sys.exit(f"{figure}: needs CUDA GPUs; this machine has none")
    if same_gpu:
        return [0] * needed
    if present < needed:
        sys.exit(
            f"{figure}: needs {needed} GPUs of one host, this machine has {present}. Run it on "
            f"{machine_kind(needed)} (benchmarks/gpu/NOTES_multi_gpu.md), or pass --same-gpu "
            "to check only the plumbing on one GPU (its JSON says same_gpu: true)."
        )
    return list(range(needed))


def topology(devices: list[int], same_gpu: bool) -> dict[str, Any]:
    """What the JSON says about the GPUs a run used: same_gpu, names, peer access between each
    pair, and `nvidia-smi topo -m` (NVLink or PCIe) where the tool is there."""
    used = sorted(set(devices))
    info: dict[str, Any] = {
        "same_gpu": same_gpu,
        "logical_gpus": len(devices),
        "cuda_devices": devices,
        "gpus_present": torch.cuda.device_count(),
        "gpu_names": {i: torch.cuda.get_device_name(i) for i in used},
        "peer_access": {
            f"{a}->{b}": torch.cuda.can_device_access_peer(a, b)
            for a in used
            for b in used
            if a != b
        },
        "multicast_off": {k: os.environ.get(k) for k in MULTICAST_OFF},
    }
    try:
        topo = subprocess.run(
            ["nvidia-smi", "topo", "-m"], capture_output=True, text=True, timeout=30
        )
        info["nvidia_smi_topo"] = topo.stdout if topo.returncode == 0 else topo.stderr
    except (OSError, subprocess.TimeoutExpired) as exc:
        info["nvidia_smi_topo"] = f"unavailable: {exc}"
    return info


def same_gpu_banner(same_gpu: bool) -> None:
    """One line on stderr that a same-GPU run's figures are plumbing only."""
    if same_gpu:
        sys.stderr.write(
            "--same-gpu: every logical GPU is cuda:0; these figures check the plumbing, "
            "they are not the multi-GPU target's\n"
        )
