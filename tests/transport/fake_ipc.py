"""FAKE CUDA IPC for machines without a GPU: the fast path's decisions, not its CUDA calls.

`FakeIpc` stands in for `transport.cuda_ipc.backend.CudaIpc` with CPU tensors of this one process: an
"exported" tensor goes into a process-wide registry under a random 64-byte handle, "opening"
the handle returns the same memory's address, and "copies" are `memmove`s in this process. Everything
around it is the real code: receiver info, validation, the choice of mover, the sender's state
machine, routes, mappings and their closing, and the first-token record over Mooncake tcp. The
real CUDA path is tested in tests/gpu/test_fast_path_gpu.py (skipped without CUDA).

`FakeIpc(hold=True)` stands in for a copy still queued on the GPU: launched copies move no
byte and their event does not pass until `finish()`.
"""

from __future__ import annotations

import ctypes
import secrets
import threading
from typing import Any

import torch

from transport.cuda_ipc.driver import IpcOpenError
from transport.cuda_ipc.kernels import Copies
from transport.cuda_ipc.routes import PageRoute, PageRuns
from transport.receiver_info import IpcAllocation

FAKE_GPU = "FAKE-GPU-0000"

_REGISTRY: dict[str, torch.Tensor] = {}  # handle -> uint8 view, shared by every FakeIpc
_EVENTS: dict[bytes, FakeEvent] = {}  # event handle -> the event, shared by every FakeIpc


class FakeDone:
    """A copy's "event": it passes once the copy ran."""

    def __init__(self, run: Any) -> None:
        self.run = run
        self.passed = threading.Event()

    def finish(self) -> None:
        if not self.passed.is_set():
            self.run()
            self.passed.set()


class FakeIpc:
    """Not CUDA: the IPC backend interface over CPU memory of this process (see module doc)."""

    def __init__(
        self,
        device_uuid: str = FAKE_GPU,
        visible: tuple[str, ...] = (FAKE_GPU,),
        fail_open: bool = False,
        hold: bool = False,
    ) -> None:
        self.uuid = device_uuid
        self.visible = set(visible)
        self.fail_open = fail_open
        self.hold = hold
        self.opened = 0
        self.closed = 0
        self.launches = 0  # the general path (segments, from the pool)
        self.page_launches = 0  # the route (runs, from `send`)
        self.routes_prepared = 0
        self.launch_threads: list[int] = []
        self.copies = 0  # raw copies (the hidden-state channel)
        self.event_log: list[tuple[str, bytes]] = []  # ("record" | "wait", event handle)
        self._held: list[FakeDone] = []

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

    def launch(self, copies: Copies, after: Any, device: Any, peer: bool) -> FakeDone:
        self.launches += 1
        self.launch_threads.append(threading.get_ident())

        def run() -> None:
            for dst, src, n in zip(copies.dsts, copies.srcs, copies.lengths, strict=True):
                ctypes.memmove(int(dst), int(src), int(n))

        return self._queue(run)

    def prepare_route(self, route: PageRoute, device: Any) -> None:
        self.routes_prepared += 1

    def launch_pages(self, route: PageRoute, runs: PageRuns, device: Any) -> FakeDone:
        self.page_launches += 1
        self.launch_threads.append(threading.get_ident())
        rows = list(zip(route.src_bases.tolist(), route.dst_bases.tolist(), strict=True))
        table = runs.rows().tolist()  # copied now, as the real backend writes its slot now

        def run() -> None:
            for src, dst in rows:
                for s_off, d_off, n in table:
                    ctypes.memmove(dst + 8 * d_off, src + 8 * s_off, 8 * n)

        return self._queue(run)

    def _queue(self, run: Any) -> FakeDone:
        done = FakeDone(run)
        if self.hold:
            self._held.append(done)
        else:
            done.finish()
        return done

    def finish(self) -> None:
        """Run every held copy (the GPU caught up)."""
        held, self._held = self._held, []
        for done in held:
            done.finish()

    def query(self, done: FakeDone) -> bool:
        return done.passed.is_set()

    def wait(self, done: FakeDone) -> None:
        if not done.passed.wait(30):
            raise TimeoutError("fake copy never finished")

    # The hidden-state channel's events (cluster/hidden_channel.py): the CPU runs every copy
    # when it is issued, so an event has nothing to wait for. They are counted, so a test can
    # state the order of records and waits.

    def export_event(self, device: Any) -> tuple[FakeEvent, bytes]:
        handle = secrets.token_bytes(64)
        event = _EVENTS[handle] = FakeEvent(handle)
        return event, handle

    def open_event(self, handle: bytes, device: Any) -> FakeEvent:
        if self.fail_open:
            raise IpcOpenError("fake: the driver refused the event handle")
        return _EVENTS[handle]

    def record_event(self, event: FakeEvent, device: Any) -> None:
        event.records += 1
        self.event_log.append(("record", event.handle))

    def wait_event(self, event: FakeEvent, device: Any) -> None:
        event.waits += 1
        self.event_log.append(("wait", event.handle))

    def copy_async(self, dst: int, src: int, nbytes: int, device: Any) -> None:
        self.copies += 1
        ctypes.memmove(dst, src, nbytes)


class FakeEvent:
    """An interprocess "event": its handle, and how often it was recorded and waited on."""

    def __init__(self, handle: bytes) -> None:
        self.handle = handle
        self.records = 0
        self.waits = 0


class FakeRuntime:
    """Not CUDA: the runtime calls `transport.cuda_ipc.staging._Staging` makes, over host memory and
    events that pass only when the test says the "GPU" got there (`finish`).

    Counts the calls, so a test can state which requests cost a CUDA call and which do not.
    """

    def __init__(self) -> None:
        self._buffers: dict[int, ctypes.Array] = {}
        self.pending: dict[int, bool] = {}  # event -> a record still to pass
        self.queries = 0
        self.synchronizes = 0
        self.freed = 0

    def host_alloc_mapped(self, nbytes: int) -> tuple[int, int]:
        buffer = (ctypes.c_byte * nbytes)()
        address = ctypes.addressof(buffer)
        self._buffers[address] = buffer
        return address, address

    def free_host(self, host: int) -> None:
        self._buffers.pop(host)
        self.freed += 1

    def event_create(self) -> int:
        event = len(self.pending) + 1
        self.pending[event] = False
        return event

    def event_destroy(self, event: int) -> None:
        return None

    def record(self, event: int) -> None:
        """A copy was queued that ends with `event` (the real launch does this)."""
        self.pending[event] = True

    def finish(self, event: int) -> None:
        """The "GPU" ran the copy before `event`'s record."""
        self.pending[event] = False

    def event_query(self, event: int) -> bool:
        self.queries += 1
        return not self.pending[event]

    def event_synchronize(self, event: int) -> None:
        self.synchronizes += 1
        self.pending[event] = False  # blocking until the GPU got there
