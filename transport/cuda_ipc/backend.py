"""What the fast path needs from the machine (`IpcBackend`: export, open, close, copy, and the
interprocess events of the hidden-state channel between PP stages) and the CUDA implementation
of it (`CudaIpc`). Tests stand in a fake over CPU tensors (tests/transport/fake_ipc.py).

`CudaIpc` copies a request's pages three ways, fastest first: a route's CUDA graph (one launch
per request), one Triton launch over the request's runs, one `cudaMemcpyAsync` per run. Its
warm-up checks the first two on a test pattern and turns off one that does not copy exactly or
does not wait for the work queued before it: a kernel or graph capture that misbehaves on some
machine costs speed, not bytes.
"""

from __future__ import annotations

import array
import logging
import threading
from typing import Any, Protocol

import numpy as np
import torch

from transport.cuda_ipc.driver import CudaRuntime, IpcOpenError
from transport.cuda_ipc.kernels import (
    _BLOCK,
    _GROUP,
    _MAX_PARTS,
    _TABLE_WORDS,
    Copies,
    _copy_kernel,
    _graph_kernel,
    _page_kernel,
    _table_kernel,
)
from transport.cuda_ipc.routes import PageRoute, PageRuns
from transport.cuda_ipc.staging import SlotDone, _Staging
from transport.receiver_info import IpcAllocation

log = logging.getLogger(__name__)

_GRAPH_RUNS = 64  # requests of up to this many runs replay one of the route's graphs


class IpcBackend(Protocol):
    """What the fast path needs from the machine: export, open, close, copy."""

    def is_device_memory(self, tensor: torch.Tensor) -> bool: ...
    def export(self, tensor: torch.Tensor) -> IpcAllocation | None: ...
    def device_uuid(self, device: torch.device) -> str: ...
    def visible_device_uuids(self) -> set[str]: ...
    def open(self, allocation: IpcAllocation, device: torch.device) -> int: ...
    def close(self, address: int, device: torch.device) -> None: ...
    def warm_up(self, device: torch.device) -> None: ...
    def record(self, device: torch.device) -> Any: ...
    def launch(self, copies: Copies, after: Any, device: torch.device, peer: bool) -> Any: ...
    def wait(self, done: Any) -> None: ...
    # The per-request path (optional: a backend without it gets the general path only).
    def prepare_route(self, route: PageRoute, device: torch.device) -> Any: ...
    # Returns the copy's end: anything with `query()` and `synchronize()`, like an event.
    def launch_pages(self, route: PageRoute, runs: PageRuns, device: torch.device) -> Any: ...
    def query(self, done: Any) -> bool: ...
    # Interprocess events and a raw copy on the caller's stream: the hidden-state channel
    # between PP stages (cluster/hidden_channel.py). A process records only events it created
    # and waits on events it opened (a CUDA event records on its own device's streams only).
    def export_event(self, device: torch.device) -> tuple[Any, bytes]: ...
    def open_event(self, handle: bytes, device: torch.device) -> Any: ...
    def record_event(self, event: Any, device: torch.device) -> None: ...
    def wait_event(self, event: Any, device: torch.device) -> None: ...
    def copy_async(self, dst: int, src: int, nbytes: int, device: torch.device) -> None: ...


def _current_device() -> int:
    return torch._C._cuda_getDevice()


def _current_raw_stream(index: int) -> int:
    """The caller's current stream on device `index`, as a raw handle (no Stream object)."""
    return torch._C._cuda_getCurrentRawStream(index)


class _OnDevice:
    """A route on the GPU: its rows, and (when capture worked) per staging slot a CUDA graph
    of [slot's run table into device memory, fixed-grid copy over it, (slot's event record)]."""

    def __init__(self, bases: torch.Tensor) -> None:
        self.bases = bases
        self.graphs: list[torch.cuda.CUDAGraph] | None = None  # one per staging slot
        self.execs: list[int] | None = None  # their cudaGraphExec_t, launched raw (or replay)
        self.records = False  # the graphs record their slot's event themselves


def _work(runs: PageRuns) -> np.ndarray:
    """A run table as the kernels read it: the count, then the runs' rows."""
    return np.array((len(runs), *runs.flat), np.int64)


class CudaIpc:
    """CUDA IPC through the runtime torch loaded; copies run on one side stream per device."""

    def __init__(self) -> None:
        self._runtime: CudaRuntime | None = None
        self._streams: dict[int, torch.cuda.Stream] = {}
        self._staging: dict[int, _Staging] = {}
        self._kernel_ok = True
        self._graphs_ok = True  # turned off if the graph kernel fails its check at warm-up
        self._graph_records = True  # graphs record their slot's event (else one more call)
        self._lock = threading.Lock()

    @property
    def runtime(self) -> CudaRuntime:
        runtime = self._runtime
        if runtime is not None:
            return runtime
        with self._lock:
            if self._runtime is None:
                self._runtime = CudaRuntime()
            return self._runtime

    @property
    def kernel_in_use(self) -> bool:
        """False once the batched copy kernel failed here and copies went one memcpy a run."""
        return self._kernel_ok

    @property
    def graphs_in_use(self) -> bool:
        """Requests of up to `_GRAPH_RUNS` runs launch a CUDA graph (else: a Triton launch)."""
        return self._graphs_ok and self._kernel_ok

    @property
    def graphs_record_events(self) -> bool:
        """The graphs end with their slot's event record (one CUDA call per request, not two)."""
        return self.graphs_in_use and self._graph_records

    def is_device_memory(self, tensor: torch.Tensor) -> bool:
        return tensor.is_cuda

    def export(self, tensor: torch.Tensor) -> IpcAllocation | None:
        if not tensor.is_cuda:
            return None
        try:
            with torch.cuda.device(tensor.device):
                base, size = self.runtime.allocation_of(tensor.data_ptr())
                handle = self.runtime.get_mem_handle(base)
        except (OSError, RuntimeError) as exc:
            # E.g. expandable segments (cuMemCreate memory has no legacy IPC handle).
            log.warning("cannot export KV memory with CUDA IPC, peers use Mooncake: %s", exc)
            return None
        return IpcAllocation(handle=handle.hex(), base=base, nbytes=size)

    def device_uuid(self, device: torch.device) -> str:
        return str(torch.cuda.get_device_properties(device).uuid)

    def visible_device_uuids(self) -> set[str]:
        if not torch.cuda.is_available():
            return set()
        return {
            str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())
        }

    def open(self, allocation: IpcAllocation, device: torch.device) -> int:
        """The peer's allocation mapped into this process (its base address here)."""
        try:
            with torch.cuda.device(device):
                return self.runtime.open_mem_handle(bytes.fromhex(allocation.handle))
        except (OSError, RuntimeError, ValueError) as exc:
            raise IpcOpenError(str(exc)) from exc

    def close(self, address: int, device: torch.device) -> None:
        with torch.cuda.device(device):
            self.runtime.close_mem_handle(address)

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        with self._lock:
            stream = self._streams.get(device.index)
            if stream is None:
                stream = self._streams[device.index] = torch.cuda.Stream(device)
            return stream

    def warm_up(self, device: torch.device) -> None:
        """Compile the copy kernels, set up the staging and check the graph path now, not on
        the first request. Each path is used only if it copies a test pattern exactly, and a
        graph's own event record only if it provably waits for work queued before it."""
        scratch = torch.zeros(64, dtype=torch.int64, device=device)
        src, dst = scratch.data_ptr(), scratch.data_ptr() + 256
        copies = Copies(*(np.array([v], np.int64) for v in (src, dst, 256)))
        self.wait(self.launch(copies, None, device, peer=False))
        with torch.cuda.device(device):
            self._check_page_copies(device)

    def _check_page_copies(self, device: torch.device) -> None:
        # Two rows of three 4-word pages: row k's page p at words 12k + 4p.
        pages = torch.zeros(24, dtype=torch.int64, device=device)
        rows = np.array([pages.data_ptr(), pages.data_ptr() + 96], np.int64)
        route = PageRoute(rows, rows, 4, 3, 3)
        pattern = torch.arange(24, device=device)

        def copies_exactly(
            src_page: int, behind_compute: bool = False, next_slot: bool = False
        ) -> bool:
            """Page `src_page` of each row onto page 2; with `behind_compute`, the copy is
            queued behind ~30 ms of GPU work, far longer than a cold process's first
            launches take, and must not report done before it ran. With `next_slot`, it
            waits on the stream, not on its slot: the slot is not known free, so the next
            check takes the next slot (a request takes the lowest free one)."""
            pages.copy_(pattern)
            if behind_compute:
                torch.cuda._sleep(50_000_000)
            done = self.launch_pages(route, PageRuns((4 * src_page, 8, 4)), device)
            early = behind_compute and done.query()
            if next_slot:
                torch.cuda.current_stream(device).synchronize()
            else:
                done.synchronize()
            want = pattern.view(2, 3, 4).clone()
            want[:, 2] = want[:, src_page]
            return not early and torch.equal(pages.view(2, 3, 4), want)

        graphs_ok, self._graphs_ok = self._graphs_ok, False  # the direct launch first
        route.table = self.prepare_route(route, device)
        if not (copies_exactly(0) and copies_exactly(1, behind_compute=True)):
            log.error("the page copy kernel failed its check; one memcpy per run instead")
            self._kernel_ok = False
            return
        self._graphs_ok = graphs_ok
        if not self._graphs_ok:
            return
        for records in (True, False):
            self._graph_records = records
            route.table = self.prepare_route(route, device)
            if not self._graphs_ok:  # no capture at all
                return
            # Every slot's graph (twice round the ring), then one behind compute.
            slots = _Staging.SLOTS
            if all(
                copies_exactly(k % 2, next_slot=True) for k in range(2 * slots)
            ) and copies_exactly(1, behind_compute=True):
                return
            if records:
                log.warning("a graph's own event record failed its check; recording per request")
        log.warning("the CUDA graph copy failed its check; launching per request instead")
        self._graphs_ok = False

    def prepare_route(self, route: PageRoute, device: torch.device) -> _OnDevice:
        """The route's rows on the device, uploaded once (per peer and layer set), and CUDA
        graphs of its copy, one per staging slot (when graphs passed the warm-up check)."""
        rows = np.stack([route.src_bases, route.dst_bases], 1)
        with torch.cuda.device(device):
            on_device = _OnDevice(torch.from_numpy(np.ascontiguousarray(rows)).to(device))
            if self._graphs_ok and self._kernel_ok:
                try:
                    self._capture(on_device, len(rows), device)
                except Exception:
                    log.warning("no CUDA graph for the copy; launching per request", exc_info=True)
                    self._graphs_ok = False
        return on_device

    def _capture(self, on_device: _OnDevice, rows: int, device: torch.device) -> None:
        """Per staging slot one graph: [slot's table from host to device memory, the copy over
        it, the slot's event record]; without the record (one more call per request) if the
        runtime will not capture it."""
        if self._graph_records:
            try:
                on_device.graphs = self._capture_slots(on_device, rows, device, records=True)
                on_device.records = True
            except Exception:
                log.warning("no event record in the copy's graphs; one per request", exc_info=True)
                self._graph_records = False
            else:
                on_device.execs = self._execs(on_device.graphs)
                return
        on_device.graphs = self._capture_slots(on_device, rows, device, records=False)
        on_device.records = False
        on_device.execs = self._execs(on_device.graphs)

    @staticmethod
    def _execs(graphs: list[torch.cuda.CUDAGraph]) -> list[int] | None:
        """The graphs' raw cudaGraphExec_t, launched by ctypes (an older torch: `replay`)."""
        try:
            return [int(g.raw_cuda_graph_exec()) for g in graphs]
        except (AttributeError, TypeError, RuntimeError):
            return None

    def _capture_slots(
        self, on_device: _OnDevice, rows: int, device: torch.device, records: bool
    ) -> list[torch.cuda.CUDAGraph]:
        table, copy = _table_kernel(), _graph_kernel()
        staging = self._staging_for(device)
        runtime = self.runtime
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        graphs = []
        with torch.cuda.stream(side):
            # Compiled and loaded outside the capture (the empty slot's table: nothing moves).
            zero = torch.zeros(_TABLE_WORDS, dtype=torch.int64, device=device)
            table[(1,)](staging.empty, zero, WORDS=_TABLE_WORDS, num_warps=4)
            copy[(rows, _GROUP)](on_device.bases, zero, BLOCK=_BLOCK, GROUP=_GROUP, num_warps=4)
            side.synchronize()
            for slot in range(_Staging.SLOTS):
                work = staging.device_rows[slot]
                graph = torch.cuda.CUDAGraph()
                graph.capture_begin(capture_error_mode="thread_local")
                try:
                    table[(1,)](staging.addresses[slot], work, WORDS=_TABLE_WORDS, num_warps=4)
                    copy[(rows, _GROUP)](
                        on_device.bases, work, BLOCK=_BLOCK, GROUP=_GROUP, num_warps=4
                    )
                    if records:
                        runtime.record_external(staging.events[slot], side.cuda_stream)
                finally:
                    graph.capture_end()
                graphs.append(graph)
        return graphs

    def _staging_for(self, device: torch.device) -> _Staging:
        staging = self._staging.get(device.index)
        if staging is None:
            runtime = self.runtime
            with self._lock:
                staging = self._staging.get(device.index)
                if staging is None:
                    with torch.cuda.device(device):
                        staging = self._staging[device.index] = _Staging(runtime, device)
        return staging

    def launch_pages(self, route: PageRoute, runs: PageRuns, device: torch.device) -> SlotDone:
        """Queue the copy of `runs` (per run: source offset, destination offset, length, in
        8-byte elements) for every row of `route` on the caller's current stream, so it runs
        after the KV queued there; returns the end of the copy (its slot's event).

        The common case makes one CUDA call: the slot's graph, which reads the table from the
        slot (host memory) and records the slot's event itself."""
        index = device.index
        if _current_device() != index:
            with torch.cuda.device(device):
                return self.launch_pages(route, runs, device)
        stream = _current_raw_stream(index)
        staging = self._staging.get(index) or self._staging_for(device)
        runtime = self._runtime or self.runtime
        on_device: _OnDevice = route.table
        n = len(runs)
        with staging.lock:
            slot, gen = staging.take()
            if n <= staging.ROWS:
                view = staging.views[slot]
                view[0] = n
                view[1 : 1 + 3 * n] = array.array("q", runs.flat)
            if on_device.graphs is not None and n <= _GRAPH_RUNS:
                if on_device.execs is not None:
                    rc = runtime.graph_launch(on_device.execs[slot], stream)
                    if rc:
                        runtime.check(rc, "cudaGraphLaunch")
                else:
                    on_device.graphs[slot].replay()
                if on_device.records:
                    return SlotDone(staging, slot, gen)
            else:
                self._launch_direct(route, runs, staging, slot, stream)
            rc = runtime.event_record(staging.events[slot], stream)
            if rc:
                runtime.check(rc, "cudaEventRecord")
        return SlotDone(staging, slot, gen)

    def _launch_direct(
        self, route: PageRoute, runs: PageRuns, staging: _Staging, slot: int, stream: int
    ) -> None:
        """One Triton launch with the runs in the grid (more runs than a graph takes, or no
        graph); the memcpy loop if the kernel is unavailable."""
        n = len(runs)
        if n <= staging.ROWS:
            table = staging.addresses[slot]  # read in place, from host memory
        else:  # a one-off device table: the caching allocator keeps it until the copy ran
            work = torch.from_numpy(_work(runs)).pin_memory()
            table = work.to(route.table.bases.device, non_blocking=True).data_ptr()
        parts = -(-runs.longest // _BLOCK)
        if self._kernel_ok:
            try:
                _page_kernel()[(route.rows, n, parts)](
                    route.table.bases, table, BLOCK=_BLOCK, num_warps=4
                )
            except Exception:  # no Triton, or it cannot compile here: the memcpy loop
                log.warning("page copy kernel unavailable, one memcpy per run", exc_info=True)
                self._kernel_ok = False
        if not self._kernel_ok:
            runtime = self.runtime
            for src, dst in zip(route.src_bases.tolist(), route.dst_bases.tolist(), strict=True):
                for s_off, d_off, length in runs.rows().tolist():
                    runtime.memcpy_async(dst + 8 * d_off, src + 8 * s_off, 8 * length, stream)

    def query(self, done: SlotDone | torch.cuda.Event) -> bool:
        """Whether the copy ending at `done` has finished (never blocks)."""
        return done.query()

    def record(self, device: torch.device) -> torch.cuda.Event:
        """An event after the work queued so far on the caller's stream (the KV it computed)."""
        return torch.cuda.current_stream(device).record_event()

    def launch(
        self, copies: Copies, after: torch.cuda.Event | None, device: torch.device, peer: bool
    ) -> torch.cuda.Event:
        """Queue `copies` on the side stream behind `after`; returns the event that ends them.

        Same GPU: one Triton launch over a table of the runs. The receiver on another GPU of
        this node: one `cudaMemcpyAsync` per run (the copy engines handle peer access).
        """
        stream = self._stream(device)
        with torch.cuda.device(device), torch.cuda.stream(stream):
            if after is not None:
                stream.wait_event(after)
            if not peer and self._kernel_ok:
                try:
                    self._launch_kernel(copies, device)
                    return stream.record_event()
                except Exception:  # no Triton, or it cannot compile here: the memcpy loop
                    log.warning(
                        "batched copy kernel unavailable, one memcpy per run", exc_info=True
                    )
                    self._kernel_ok = False
            for dst, src, n in zip(copies.dsts, copies.srcs, copies.lengths, strict=True):
                self.runtime.memcpy_async(int(dst), int(src), int(n), stream.cuda_stream)
            return stream.record_event()

    def _launch_kernel(self, copies: Copies, device: torch.device) -> None:
        wide = not ((copies.srcs | copies.dsts | copies.lengths) & 7).any()
        table = np.stack(
            [copies.srcs, copies.dsts, copies.lengths // 8 if wide else copies.lengths], 1
        )
        # Pinned, so the upload is asynchronous and ordered on the side stream like the copy.
        on_device = torch.from_numpy(table).pin_memory().to(device, non_blocking=True)
        parts = -(-int(table[:, 2].max()) // _BLOCK)
        if parts > _MAX_PARTS:
            raise ValueError(f"a run of {parts} blocks is longer than one launch covers")
        _copy_kernel()[(len(copies), parts)](on_device, BLOCK=_BLOCK, WIDE=wide, num_warps=4)

    def wait(self, done: SlotDone | torch.cuda.Event) -> None:
        done.synchronize()

    # the hidden-state channel's events and copy ---------------------------------------------

    def export_event(self, device: torch.device) -> tuple[torch.cuda.Event, bytes]:
        """A new interprocess event on `device` and its IPC handle (it exists before any
        record: a wait on it before its first record passes at once)."""
        with torch.cuda.device(device):
            event = torch.cuda.Event(interprocess=True)
            return event, bytes(event.ipc_handle())

    def open_event(self, handle: bytes, device: torch.device) -> torch.cuda.Event:
        """A peer's event opened here; waited on, never recorded (it lives on the peer's GPU)."""
        try:
            return torch.cuda.Event.from_ipc_handle(device, handle)
        except (RuntimeError, ValueError) as exc:
            raise IpcOpenError(f"cannot open a peer's CUDA event: {exc}") from exc

    def record_event(self, event: torch.cuda.Event, device: torch.device) -> None:
        event.record(torch.cuda.current_stream(device))

    def wait_event(self, event: torch.cuda.Event, device: torch.device) -> None:
        torch.cuda.current_stream(device).wait_event(event)

    def copy_async(self, dst: int, src: int, nbytes: int, device: torch.device) -> None:
        """`nbytes` from `src` to `dst` on the caller's current stream on `device`; unified
        addressing finds both ends (a peer's mapped memory may be on another GPU)."""
        with torch.cuda.device(device):
            stream = torch.cuda.current_stream(device).cuda_stream
            self.runtime.memcpy_async(dst, src, nbytes, stream)
