"""FAKE CUDA IPC for machines without a GPU: the fast path's decisions, not its CUDA calls.

`FakeIpc` stands in for `transport.cuda_ipc.CudaIpc` with CPU tensors of this one process: an
"exported" tensor goes into a process-wide registry under a random 64-byte handle, "opening"
the handle returns the same memory's address, and "copies" are `memmove`s in this process. Everything
around it is the real code: receiver info, validation, the choice of mover, the sender's state
machine, mappings and their closing, and the first-token record over Mooncake tcp. The real
CUDA path is tested in tests/gpu/test_fast_path_gpu.py (skipped without CUDA).
"""

from __future__ import annotations

import ctypes
import secrets
from typing import Any

import torch

from transport.cuda_ipc import Copies, IpcOpenError
from transport.receiver_info import IpcAllocation

FAKE_GPU = "FAKE-GPU-0000"

_REGISTRY: dict[str, torch.Tensor] = {}  # handle -> uint8 view, shared by every FakeIpc


class FakeIpc:
    """Not CUDA: the IPC backend interface over CPU memory of this process (see module doc)."""

    def __init__(
        self,
        device_uuid: str = FAKE_GPU,
        visible: tuple[str, ...] = (FAKE_GPU,),
        fail_open: bool = False,
    ) -> None:
        self.uuid = device_uuid
        self.visible = set(visible)
        self.fail_open = fail_open
        self.opened = 0
        self.closed = 0
        self.launches = 0

    def is_device_memory(self, tensor: torch.Tensor) -> bool:
        return True  # pretend every tensor is GPU memory

    def export(self, tensor: torch.Tensor) -> IpcAllocation:
        return self.export_as(tensor, tensor.data_ptr())

    @staticmethod
    def export_as(tensor: torch.Tensor, base: int) -> IpcAllocation:
        """Register `tensor` as the allocation at `base` of some (possibly other) process."""
        handle = secrets.token_hex(64)
        _REGISTRY[handle] = tensor.reshape(-1).view(torch.uint8)
        return IpcAllocation(
            handle=handle, base=base, nbytes=tensor.numel() * tensor.element_size()
        )

    def device_uuid(self, device: torch.device) -> str:
        return self.uuid

    def visible_device_uuids(self) -> set[str]:
        return self.visible

    def open(self, allocation: IpcAllocation, device: torch.device) -> int:
        if self.fail_open:
            raise IpcOpenError("fake: the driver refused the handle")
        self.opened += 1
        return _REGISTRY[allocation.handle].data_ptr()

    def close(self, address: int, device: torch.device) -> None:
        self.closed += 1

    def warm_up(self, device: torch.device) -> None:
        return None

    def record(self, device: torch.device) -> None:
        return None

    def launch(self, copies: Copies, after: Any, device: Any, peer: bool) -> None:
        self.launches += 1
        for dst, src, n in zip(copies.dsts, copies.srcs, copies.lengths, strict=True):
            ctypes.memmove(int(dst), int(src), int(n))

    def wait(self, done: Any) -> None:
        return None
