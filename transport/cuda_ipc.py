"""The same-node fast path: KV pages move GPU to GPU through CUDA IPC instead of Mooncake tcp.

A decode process exports each device allocation that holds its KV once (`cudaIpcGetMemHandle`)
and offers the handles in its receiver info, with the node it runs on and its GPU's UUID. A
prefill stage on the same node that can see that GPU opens the handles once per peer.

Per peer and layer set, a `PageRoute` is worked out once: where K and V of every layer start
on both sides (the peer's as mapped here), uploaded to the GPU as a small table, and CUDA graphs
of its copy, one per staging slot. A request then costs its page runs (a list compare when both
sides are one run), the run table written into its slot of mapped pinned host memory (which the
GPU reads itself: no upload call) and one `cudaGraphLaunch` on the caller's stream, issued by
`send` on the thread that computed the KV (queued behind it; no thread hop). The graph ends by
recording the slot's event, which the sender's `poll` queries; the write is done only once it
has passed. Every per-request CUDA call is a ctypes function bound once, on raw handles.

Whatever a route cannot take (strided pages, the receiver on another GPU of the node, pages
outside the cache) goes the general way: the tcp path's segments, planned against the mapping,
copied on a side stream from the transfer pool, the rest by Mooncake.

This module only moves bytes and decides whether it can: the sender's state machine,
validation, timeouts and the first-token record (CPU memory, so still Mooncake) are the tcp
path's. Whenever the peer is elsewhere, the memory is CPU memory, or an open fails, the sender
gets the Mooncake mover instead. Mappings stay open per peer while it answers probes; a peer
whose probe fails (it went away) or the endpoint's close unmaps them, after any copy still
using them has finished.
"""

from __future__ import annotations

import array
import ctypes
import glob
import logging
import os
import socket
import threading
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache
from typing import Any, Protocol

import numpy as np
import torch

from engine.kv_cache import KVLayerRegion, PagedKVCache
from transport.receiver_info import CudaIpcInfo, IpcAllocation, LayerAddress, ReceiverInfo
from transport.segments import Segments

log = logging.getLogger(__name__)


class IpcOpenError(RuntimeError):
    """A peer's IPC handle could not be opened here; the sender falls back to Mooncake."""


@cache
def node_id() -> str:
    """This machine's identity as peers compare it: hostname and kernel boot id.

    The boot id tells two machines (or two boots) with one hostname apart; the hostname tells
    two containers on one kernel apart, where CUDA IPC may not reach across anyway.
    """
    boot = ""
    for path in ("/proc/sys/kernel/random/boot_id", "/etc/machine-id"):
        try:
            with open(path) as f:
                boot = f.read().strip()
            break
        except OSError:
            continue
    return f"{socket.gethostname()}/{boot}"


# -- the CUDA runtime and driver calls, through ctypes (no extra dependency) ----------------------


class _IpcMemHandle(ctypes.Structure):
    _fields_ = (("reserved", ctypes.c_ubyte * 64),)


_LAZY_ENABLE_PEER_ACCESS = 1  # cudaIpcMemLazyEnablePeerAccess
_MEMCPY_DEFAULT = 4  # cudaMemcpyDefault
_HOST_ALLOC_PORTABLE_MAPPED = 1 | 2  # cudaHostAllocPortable | cudaHostAllocMapped
_EVENT_DISABLE_TIMING = 2  # cudaEventDisableTiming
_EVENT_RECORD_EXTERNAL = 1  # cudaEventRecordExternal: an event record node when captured
_NOT_READY = 600  # cudaErrorNotReady


def _bind(lib: ctypes.CDLL, name: str, *argtypes: Any) -> Any:
    fn = getattr(lib, name)
    fn.argtypes = argtypes
    fn.restype = ctypes.c_int
    return fn


class CudaRuntime:
    """The few runtime/driver entry points IPC needs, from the libraries torch already loaded.

    The per-request ones (`graph_launch`, `event_record`, `event_query`) are bound once with
    their argument types and called on raw handles. They come through `PyDLL`, so they keep the
    GIL like torch's own launches do: none of them blocks, and releasing the GIL around a
    microsecond call only invites another thread to take it for longer. Blocking calls
    (`event_synchronize`) release it.
    """

    def __init__(self) -> None:
        torch.cuda.init()
        self._rt = self._load_cudart()
        self._drv = ctypes.CDLL("libcuda.so.1")
        self._rt.cudaGetErrorString.restype = ctypes.c_char_p
        self._rt.cudaGetErrorString.argtypes = (ctypes.c_int,)
        self._rt.cudaIpcGetMemHandle.argtypes = (ctypes.POINTER(_IpcMemHandle), ctypes.c_void_p)
        self._rt.cudaIpcOpenMemHandle.argtypes = (
            ctypes.POINTER(ctypes.c_void_p),
            _IpcMemHandle,
            ctypes.c_uint,
        )
        self._rt.cudaIpcCloseMemHandle.argtypes = (ctypes.c_void_p,)
        self._rt.cudaMemcpyAsync.argtypes = (
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_void_p,
        )
        self._drv.cuMemGetAddressRange_v2.argtypes = (
            ctypes.POINTER(ctypes.c_uint64),
            ctypes.POINTER(ctypes.c_size_t),
            ctypes.c_uint64,
        )
        void_p, pp = ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)
        self._host_alloc = _bind(self._rt, "cudaHostAlloc", pp, ctypes.c_size_t, ctypes.c_uint)
        self._host_device_pointer = _bind(
            self._rt, "cudaHostGetDevicePointer", pp, void_p, ctypes.c_uint
        )
        self._free_host = _bind(self._rt, "cudaFreeHost", void_p)
        self._event_create = _bind(self._rt, "cudaEventCreateWithFlags", pp, ctypes.c_uint)
        self._event_destroy = _bind(self._rt, "cudaEventDestroy", void_p)
        self._event_synchronize = _bind(self._rt, "cudaEventSynchronize", void_p)
        self._record_with_flags = _bind(
            self._rt, "cudaEventRecordWithFlags", void_p, void_p, ctypes.c_uint
        )
        hot = ctypes.PyDLL(self._rt._name)  # the same library, called with the GIL held
        self.graph_launch = _bind(hot, "cudaGraphLaunch", void_p, void_p)
        self.event_record = _bind(hot, "cudaEventRecord", void_p, void_p)
        self._event_query = _bind(hot, "cudaEventQuery", void_p)
        self._get_last_error = _bind(hot, "cudaGetLastError")

    @staticmethod
    def _load_cudart() -> ctypes.CDLL:
        major = (torch.version.cuda or "").split(".")[0]
        # The soname torch linked against resolves to the copy already loaded in this process.
        names = [f"libcudart.so.{major}", "libcudart.so"]
        torch_dir = os.path.dirname(os.path.dirname(torch.__file__))
        names += sorted(
            glob.glob(os.path.join(torch_dir, "nvidia", "**", "libcudart.so*"), recursive=True)
        )
        errors = []
        for name in names:
            try:
                return ctypes.CDLL(name)
            except OSError as exc:
                errors.append(str(exc))
        raise OSError("cannot load libcudart: " + "; ".join(errors))

    def check(self, rc: int, what: str) -> None:
        if rc != 0:
            # Clear the runtime's last error, or torch's next launch check would report it.
            self._rt.cudaGetLastError()
            msg = self._rt.cudaGetErrorString(rc).decode(errors="replace")
            raise RuntimeError(f"{what} failed: {msg} ({rc})")

    def allocation_of(self, address: int) -> tuple[int, int]:
        """Base and size of the device allocation (cudaMalloc block) holding `address`."""
        base, size = ctypes.c_uint64(), ctypes.c_size_t()
        rc = self._drv.cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size), address)
        if rc != 0:
            raise RuntimeError(f"cuMemGetAddressRange({address:#x}) failed ({rc})")
        return base.value, size.value

    def get_mem_handle(self, base: int) -> bytes:
        handle = _IpcMemHandle()
        self.check(self._rt.cudaIpcGetMemHandle(ctypes.byref(handle), base), "cudaIpcGetMemHandle")
        return bytes(handle.reserved)

    def open_mem_handle(self, raw: bytes) -> int:
        ptr = ctypes.c_void_p()
        handle = _IpcMemHandle.from_buffer_copy(raw)
        rc = self._rt.cudaIpcOpenMemHandle(ctypes.byref(ptr), handle, _LAZY_ENABLE_PEER_ACCESS)
        self.check(rc, "cudaIpcOpenMemHandle")
        return int(ptr.value or 0)

    def close_mem_handle(self, ptr: int) -> None:
        self.check(self._rt.cudaIpcCloseMemHandle(ptr), "cudaIpcCloseMemHandle")

    def memcpy_async(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        """cudaMemcpyAsync with cudaMemcpyDefault: unified addressing finds both devices."""
        rc = self._rt.cudaMemcpyAsync(dst, src, nbytes, _MEMCPY_DEFAULT, stream)
        self.check(rc, "cudaMemcpyAsync")

    # mapped host memory and events, for the per-request path ---------------------------------

    def host_alloc_mapped(self, nbytes: int) -> tuple[int, int]:
        """Pinned host memory the GPU reads in place: its host address and its device address."""
        host, device = ctypes.c_void_p(), ctypes.c_void_p()
        rc = self._host_alloc(ctypes.byref(host), nbytes, _HOST_ALLOC_PORTABLE_MAPPED)
        self.check(rc, "cudaHostAlloc")
        rc = self._host_device_pointer(ctypes.byref(device), host, 0)
        if rc != 0:
            self._free_host(host)
            self.check(rc, "cudaHostGetDevicePointer")
        return int(host.value or 0), int(device.value or 0)

    def free_host(self, host: int) -> None:
        self.check(self._free_host(host), "cudaFreeHost")

    def event_create(self) -> int:
        """A raw event without timing, on the current device."""
        event = ctypes.c_void_p()
        self.check(
            self._event_create(ctypes.byref(event), _EVENT_DISABLE_TIMING), "cudaEventCreate"
        )
        return int(event.value or 0)

    def event_destroy(self, event: int) -> None:
        self._event_destroy(event)

    def record_external(self, event: int, stream: int) -> None:
        """Record `event` on a capturing stream as a node of the graph (it records per launch)."""
        rc = self._record_with_flags(event, stream, _EVENT_RECORD_EXTERNAL)
        self.check(rc, "cudaEventRecordWithFlags")

    def event_query(self, event: int) -> bool:
        """Whether the work before the event's last record has finished (never blocks)."""
        rc = self._event_query(event)
        if rc == 0:
            return True
        if rc == _NOT_READY:
            self._get_last_error()  # as torch does: "not ready" must not linger as an error
            return False
        self.check(rc, "cudaEventQuery")
        return False

    def event_synchronize(self, event: int) -> None:
        self.check(self._event_synchronize(event), "cudaEventSynchronize")


@dataclass(frozen=True)
class Copies:
    """One request's device-to-device runs: absolute source, mapped destination, bytes."""

    srcs: np.ndarray  # int64
    dsts: np.ndarray  # int64, addresses in this process (the peer's memory as mapped here)
    lengths: np.ndarray  # int64

    def __len__(self) -> int:
        return len(self.srcs)

    @property
    def nbytes(self) -> int:
        return int(self.lengths.sum())


@cache
def _copy_kernel() -> Any:
    """A Triton kernel copying every run of a table in one launch (Triton ships with CUDA torch)."""
    import triton
    import triton.language as tl

    @triton.jit
    def copy_runs(table, BLOCK: tl.constexpr, WIDE: tl.constexpr):
        # One row per run: source address, destination address, length in elements.
        row = table + tl.program_id(0) * 3
        if WIDE:  # every address and length a multiple of 8: 8-byte elements
            src = tl.load(row).to(tl.pointer_type(tl.int64))
            dst = tl.load(row + 1).to(tl.pointer_type(tl.int64))
        else:
            src = tl.load(row).to(tl.pointer_type(tl.int8))
            dst = tl.load(row + 1).to(tl.pointer_type(tl.int8))
        n = tl.load(row + 2)
        offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n  # programs past a shorter run's end do nothing
        tl.store(dst + offs, tl.load(src + offs, mask=mask), mask=mask)

    return copy_runs


@cache
def _page_kernel() -> Any:
    """The route's copy: a program per (layer x K/V row, page run, block of the run)."""
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["work_address"])
    def copy_pages(bases, work_address, BLOCK: tl.constexpr):
        # bases: per row the source and (mapped) destination start of one layer's K or V, in
        # bytes, 8-byte aligned. work_address: the run table (`_work`), read where it lies:
        # mapped pinned host memory (a staging slot) or device memory. Per run the source
        # offset, destination offset and length, in 8-byte elements. An address, not a
        # tensor, and not specialised: the same compiled kernel for every slot.
        work = work_address.to(tl.int64).to(tl.pointer_type(tl.int64))
        row = bases + tl.program_id(0) * 2
        src = tl.load(row).to(tl.pointer_type(tl.int64))
        dst = tl.load(row + 1).to(tl.pointer_type(tl.int64))
        run = work + 1 + tl.program_id(1) * 3  # work[0] is the count (see `_work`)
        n = tl.load(run + 2)
        offs = tl.program_id(2).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n  # programs past a shorter run's end do nothing
        values = tl.load(src + tl.load(run) + offs, mask=mask)
        tl.store(dst + tl.load(run + 1) + offs, values, mask=mask)

    return copy_pages


@cache
def _table_kernel() -> Any:
    """A graph's first node: its slot's run table from mapped host memory into device memory,
    in one read over PCIe, so the copy's programs read it from L2: read from host memory by
    every program, each run would cost each program a dependent PCIe round trip (a scattered
    request has up to 64 runs)."""
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["host_address"])
    def load_table(host_address, table, WORDS: tl.constexpr):
        host = host_address.to(tl.int64).to(tl.pointer_type(tl.int64))
        offs = tl.arange(0, WORDS)
        tl.store(table + offs, tl.load(host + offs))

    return load_table


@cache
def _graph_kernel() -> Any:
    """The route's copy on a fixed grid (layer x K/V row, GROUP), for a CUDA graph: how many runs
    and how long each is comes from the table at run time, so one captured launch serves every
    request; run r's blocks go to programs r, r + 1, ... (mod GROUP) so short runs spread."""
    import triton
    import triton.language as tl

    @triton.jit
    def copy_pages_fixed(bases, work, BLOCK: tl.constexpr, GROUP: tl.constexpr):
        row = bases + tl.program_id(0) * 2
        src = tl.load(row).to(tl.pointer_type(tl.int64))
        dst = tl.load(row + 1).to(tl.pointer_type(tl.int64))
        g = tl.program_id(1).to(tl.int64)
        count = tl.load(work)
        for r in range(0, count):
            run = work + 1 + r * 3
            s_off = tl.load(run)
            d_off = tl.load(run + 1)
            n = tl.load(run + 2)
            first = (g - r % GROUP + GROUP) % GROUP
            for part in range(first, (n + BLOCK - 1) // BLOCK, GROUP):
                offs = part * BLOCK + tl.arange(0, BLOCK)
                mask = offs < n
                values = tl.load(src + s_off + offs, mask=mask)
                tl.store(dst + d_off + offs, values, mask=mask)

    return copy_pages_fixed


_BLOCK = 4096  # elements per program: 32 KiB of 8-byte elements
_MAX_PARTS = 65535  # the grid's second dimension: runs up to 2 GiB (one layer's K is far less)
_MAX_RUNS = 65535  # a route's grid: runs in the second dimension
_GROUP = 64  # the graph kernel's programs per row
_GRAPH_RUNS = 64  # requests of up to this many runs replay one of the route's graphs
_TABLE_WORDS = 256  # what a graph's table node copies: 1 + 3 * _GRAPH_RUNS words fit


class _OnDevice:
    """A route on the GPU: its rows, and (when capture worked) per staging slot a CUDA graph
    of [slot's run table into device memory, fixed-grid copy over it, (slot's event record)]."""

    def __init__(self, bases: torch.Tensor) -> None:
        self.bases = bases
        self.graphs: list[torch.cuda.CUDAGraph] | None = None  # one per staging slot
        self.execs: list[int] | None = None  # their cudaGraphExec_t, launched raw (or replay)
        self.records = False  # the graphs record their slot's event themselves


@dataclass
class PageRoute:
    """How one sender's layers reach one peer's layers, worked out once and reused per request.

    Rows are (layer, K or V) in the sender's layer order; both sides hold pages contiguously
    (page stride = page size), so a run of pages is one range per row on each side.
    """

    src_bases: np.ndarray  # int64 per row: where K or V of the layer starts here
    dst_bases: np.ndarray  # int64 per row: where it starts on the peer, as mapped here
    page_words: int  # 8-byte elements per page of K or V
    local_pages: int  # pages each local layer holds (page indices must be below)
    remote_pages: int  # likewise on the peer
    table: Any = None  # the backend's copy of (src_bases, dst_bases): a device tensor on CUDA
    _numbers: list[int] | None = None  # 0 .. local_pages - 1, built once (`page_numbers`)

    @property
    def rows(self) -> int:
        return len(self.src_bases)

    def page_numbers(self, first: int, n: int) -> list[int]:
        """`list(range(first, first + n))` as a slice of a list built once: comparing a
        request's pages against it checks one run without creating n int objects."""
        if self._numbers is None:
            self._numbers = list(range(self.local_pages))
        return self._numbers[first : first + n]


class PageRuns:
    """One request's page runs over a route: per run (source offset, destination offset,
    length) in 8-byte elements, kept as one flat tuple of Python ints.

    Not numpy, on purpose: a request is launched by a thread that has usually just woken (it
    waited for the GPU or for a message), and there every numpy call costs ~10 us before any
    work (measured on the H100 host after a 1 ms sleep: a 1x3 array 10 us, against 3 us hot;
    writing one run into the slot with numpy 16 us, with a memoryview 3 us). A one-run request
    (the usual case) makes no numpy call at all; planning several runs does (`plan_runs`).
    """

    __slots__ = ("flat",)

    def __init__(self, flat: tuple[int, ...]) -> None:
        self.flat = flat

    @classmethod
    def of(cls, rows: np.ndarray) -> PageRuns:
        """From rows of (source offset, destination offset, length)."""
        return cls(tuple(rows.reshape(-1).tolist()))

    def __len__(self) -> int:
        return len(self.flat) // 3

    @property
    def words(self) -> int:
        """8-byte elements moved per (layer, K or V) row."""
        return sum(self.flat[2::3])

    @property
    def longest(self) -> int:
        return max(self.flat[2::3], default=0)

    def rows(self) -> np.ndarray:
        return np.array(self.flat, np.int64).reshape(-1, 3)


def plan_runs(route: PageRoute, local_pages: list[int], remote: np.ndarray) -> PageRuns | None:
    """Page runs for local page `local_pages[i]` to go to `remote[i]`; None when the route
    cannot take them."""
    n = len(local_pages)
    if n > len(remote):
        return None
    if n == 0:
        return PageRuns(())
    local = np.array(local_pages, np.int64)
    theirs = remote[:n]
    if local.min() < 0 or local.max() >= route.local_pages:
        return None
    if theirs.min() < 0 or theirs.max() >= route.remote_pages:
        return None
    # A run continues while both sides step by one page.
    breaks = np.flatnonzero((np.diff(local) != 1) | (np.diff(theirs) != 1)) + 1
    if len(breaks) >= _MAX_RUNS:
        return None
    starts = np.concatenate(([0], breaks))
    runs = np.empty((len(starts), 3), np.int64)
    runs[:, 0] = local[starts] * route.page_words
    runs[:, 1] = theirs[starts] * route.page_words
    runs[:, 2] = np.diff(np.concatenate((starts, [n]))) * route.page_words
    return PageRuns.of(runs)


def _work(runs: PageRuns) -> np.ndarray:
    """A run table as the kernels read it: the count, then the runs' rows."""
    return np.array((len(runs), *runs.flat), np.int64)


class _Staging:
    """Per-request run tables in mapped pinned host memory, one slot each, and per slot a raw
    event that ends the copy which read it.

    The GPU reads a slot where it lies (a graph's table node, or the direct kernel), so a
    request writes its table through a memoryview and makes no upload call. A slot is written
    again only after the copy that read it has finished (its event), so a table is never
    overwritten under a copy still queued behind the caller's compute. Generations tell a request's end
    from a later one on the same slot: `passed` never reports a request done early, and once
    any poll saw a slot's event pass, taking the slot again costs no CUDA call.

    A request takes the lowest slot known free, not the next one round the ring: requests that
    come one at a time then launch the same slot's graph each time, whose driver state is still
    in the CPU's caches. Measured once on the H100 host in the sender's flow (2k tokens, the GPU
    idle, time stamps): the graph launch 15 us with one slot against 22 us cycling through 16,
    send->Success 92 against 108 us; the spread between sessions is about as large
    (benchmarks/gpu/NOTES_transport.md). Only when every slot is busy does a request wait, for
    the oldest copy.
    """

    SLOTS = 16
    ROWS = 4096  # runs per request that fit a slot; more take a one-off device table

    def __init__(self, runtime: Any, device: torch.device) -> None:
        self._runtime = runtime
        self.words = 2 * ((1 + 3 * self.ROWS + 1) // 2)  # a slot's stride: 16-byte aligned
        # One more slot, always zero (no runs): the graphs' kernels are compiled against it.
        count = self.words * (self.SLOTS + 1)
        host, mapped = runtime.host_alloc_mapped(8 * count)
        ctypes.memset(host, 0, 8 * count)
        # Per slot its words as a memoryview: a request writes its table without numpy.
        words = memoryview((ctypes.c_int64 * count).from_address(host)).cast("B").cast("q")
        self.views = [words[i * self.words : (i + 1) * self.words] for i in range(self.SLOTS)]
        self.addresses = [mapped + 8 * self.words * i for i in range(self.SLOTS + 1)]
        self.empty = self.addresses[self.SLOTS]
        # The graphs' tables in device memory, a slot each (`_table_kernel` fills them).
        self.device = torch.zeros((self.SLOTS, _TABLE_WORDS), dtype=torch.int64, device=device)
        self.device_rows = [self.device[i] for i in range(self.SLOTS)]
        self.events = [runtime.event_create() for _ in range(self.SLOTS)]
        self._gens = [0] * self.SLOTS  # requests that took each slot
        self._passed = [0] * self.SLOTS  # of those, how many are known to have finished
        self._taken = [0] * self.SLOTS  # when each slot was last taken (a count of takes)
        self._takes = 0
        self.lock = threading.Lock()  # held from `take` to the record: one slot, one request
        finalizer = weakref.finalize(self, _free_staging, runtime, host, tuple(self.events))
        finalizer.atexit = False  # at exit the process's memory goes anyway

    def take(self) -> tuple[int, int]:
        """The lowest free slot and this request's generation on it; the caller holds `lock`."""
        gens, passed = self._gens, self._passed
        for i in range(self.SLOTS):
            if passed[i] >= gens[i]:
                break
        else:  # 16 requests still queued behind compute: wait for the oldest
            i = min(range(self.SLOTS), key=self._taken.__getitem__)
            self.wait(i, gens[i])
        self._takes += 1
        self._taken[i] = self._takes
        gens[i] += 1
        return i, gens[i]

    def passed(self, slot: int, gen: int) -> bool:
        """Whether request `gen` of `slot` has finished (never blocks)."""
        if self._passed[slot] >= gen:
            return True
        # The event's last record is this request's or, if the slot was taken again since,
        # a later one's (taken only after this one passed): ready means this one is done.
        if not self._runtime.event_query(self.events[slot]):
            return False
        self._note(slot, gen)
        return True

    def wait(self, slot: int, gen: int) -> None:
        """Block until request `gen` of `slot` has finished."""
        if self._passed[slot] < gen:
            self._runtime.event_synchronize(self.events[slot])
            self._note(slot, gen)

    def _note(self, slot: int, gen: int) -> None:
        if self._passed[slot] < gen:
            self._passed[slot] = gen


def _free_staging(runtime: Any, host: int, events: tuple[int, ...]) -> None:
    try:
        for event in events:
            runtime.event_destroy(event)
        runtime.free_host(host)
    except Exception:  # freeing at teardown: nothing to keep
        log.debug("freeing fast-path staging failed", exc_info=True)


class SlotDone:
    """The end of one request's copy launched over a route: its slot's event, this request's
    generation on it. Duck-types `torch.cuda.Event` (`query`, `synchronize`)."""

    __slots__ = ("gen", "slot", "staging")

    def __init__(self, staging: _Staging, slot: int, gen: int) -> None:
        self.staging = staging
        self.slot = slot
        self.gen = gen

    def query(self) -> bool:
        return self.staging.passed(self.slot, self.gen)

    def synchronize(self) -> None:
        self.staging.wait(self.slot, self.gen)


# -- backends: the real CUDA one, and (in tests) a fake over CPU tensors -------------------------


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


def _current_device() -> int:
    return torch._C._cuda_getDevice()


def _current_raw_stream(index: int) -> int:
    """The caller's current stream on device `index`, as a raw handle (no Stream object)."""
    return torch._C._cuda_getCurrentRawStream(index)


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
            queued behind ~30 ms of GPU work and must not report done before it ran (a cold
            process's first launches can take over a millisecond: with ~1 ms of work queued,
            the check failed once on a fresh machine and turned the graphs off). With
            `next_slot`, it waits on the stream, not on its slot: the slot is not known free,
            so the next check takes the next slot (a request takes the lowest free one)."""
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


# -- per-peer mappings ----------------------------------------------------------------------------


class PeerMapping:
    """One peer's opened allocations; closing waits for the copies that are using them."""

    def __init__(
        self, session: str, device: torch.device, backend: IpcBackend, same_device: bool
    ) -> None:
        self.session = session
        self.device = device  # ours, where the copies run and the handles are opened
        self.same_device = same_device  # the peer's KV is on our GPU (else a peer GPU)
        self._backend = backend
        self._opened: dict[str, tuple[IpcAllocation, int]] = {}  # handle -> (it, mapped base)
        self._bases = np.empty(0, np.int64)  # the peer's allocation bases, sorted
        self._ends = np.empty(0, np.int64)
        self._mapped = np.empty(0, np.int64)  # where each is mapped here
        self.routes: dict[tuple, PageRoute | None] = {}  # worked out once per layer set
        self._users = 0
        self._closed = False
        self._lock = threading.Lock()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def users(self) -> int:
        """Copies holding the mapping open (it unmaps after the last, once closed)."""
        return self._users

    def open_all(self, allocations: Iterable[IpcAllocation]) -> None:
        """Open what is not open yet; on failure nothing new stays open."""
        with self._lock:
            new = [a for a in allocations if a.handle not in self._opened]
            done: list[tuple[IpcAllocation, int]] = []
            try:
                for a in new:
                    done.append((a, self._backend.open(a, self.device)))
            except IpcOpenError:
                for _, address in done:
                    self._close_one(address)
                raise
            for a, address in done:
                self._opened[a.handle] = (a, address)
            self._index()

    def _index(self) -> None:
        ordered = sorted(self._opened.values(), key=lambda o: o[0].base)
        self._bases = np.array([a.base for a, _ in ordered], np.int64)
        self._ends = np.array([a.base + a.nbytes for a, _ in ordered], np.int64)
        self._mapped = np.array([address for _, address in ordered], np.int64)

    def translate(self, dsts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Where the peer's `[dst, dst + length)` ranges are mapped here, and which are."""
        i = np.searchsorted(self._bases, dsts, side="right") - 1
        inside = i >= 0
        j = np.where(inside, i, 0)
        if len(self._bases):
            inside &= dsts + lengths <= self._ends[j]
            return np.where(inside, self._mapped[j] + (dsts - self._bases[j]), 0), inside
        return np.zeros_like(dsts), np.zeros(len(dsts), bool)

    def acquire(self) -> bool:
        with self._lock:
            if self._closed:
                return False
            self._users += 1
            return True

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            unmap = self._closed and self._users == 0
        if unmap:
            self._unmap()

    def close(self) -> None:
        """Unmap now, or when the last running copy releases. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            unmap = self._users == 0
        if unmap:
            self._unmap()

    def _unmap(self) -> None:
        with self._lock:
            opened, self._opened = list(self._opened.values()), {}
            self._index()
            self.routes.clear()
        for _, address in opened:
            self._close_one(address)

    def _close_one(self, address: int) -> None:
        try:
            self._backend.close(address, self.device)
        except Exception:  # a dead peer's handle may not close cleanly; nothing to keep
            log.warning("closing a CUDA IPC mapping of %s failed", self.session, exc_info=True)


# -- the fast path of one endpoint ----------------------------------------------------------------


class CudaIpcPath:
    """An endpoint's same-node fast path: what it exports, what it has mapped, how it copies."""

    def __init__(
        self,
        backend: IpcBackend,
        watch: Callable[[str], None],
        unwatch: Callable[[str], None],
    ) -> None:
        self.backend = backend
        self._watch = watch
        self._unwatch = unwatch
        self._exports: dict[int, IpcAllocation] = {}  # layer base address -> its allocation
        self._local_bases = np.empty(0, np.int64)  # this process's device KV regions, sorted
        self._local_ends = np.empty(0, np.int64)
        self._device_of: dict[int, torch.device] = {}  # layer base -> device
        self._mappings: dict[str, PeerMapping] = {}
        self._broken: dict[str, str] = {}  # sessions whose handles would not open, and why
        self._copies: set[IpcCopy] = set()  # launched and not yet released
        self._lock = threading.Lock()

    # receiver side ---------------------------------------------------------------------------

    def add_cache(self, cache: PagedKVCache) -> None:
        """Make a KV cache a copy source here and offerable to peers (device memory only)."""
        for tensor, region in zip(cache.layers, cache.regions(), strict=True):
            if not self.backend.is_device_memory(tensor):
                return
            with self._lock:
                self._device_of[region.base_address] = tensor.device
                regions = sorted(
                    {*zip(self._local_bases.tolist(), self._local_ends.tolist(), strict=True)}
                    | {(region.base_address, region.base_address + region.nbytes)}
                )
                self._local_bases = np.array([b for b, _ in regions], np.int64)
                self._local_ends = np.array([e for _, e in regions], np.int64)
            allocation = self.backend.export(tensor)
            if allocation is not None:
                self._exports[region.base_address] = allocation
        if cache.layers and self.backend.is_device_memory(cache.layers[0]):
            self.backend.warm_up(cache.layers[0].device)

    def offer(self, layer_bases: list[int]) -> CudaIpcInfo | None:
        """The IPC part of receiver info for layers at `layer_bases`, if all are exported."""
        allocations = [self._exports.get(b) for b in layer_bases]
        if not layer_bases or any(a is None for a in allocations):
            return None
        devices = {self._device_of[b] for b in layer_bases}
        if len(devices) != 1:
            return None
        unique = {a.handle: a for a in allocations if a is not None}
        return CudaIpcInfo(
            node_id=node_id(),
            device_uuid=self.backend.device_uuid(devices.pop()),
            allocations=tuple(sorted(unique.values(), key=lambda a: a.base)),
        )

    # sender side -----------------------------------------------------------------------------

    def select(self, info: ReceiverInfo, layer_bases: list[int]) -> tuple[PeerMapping | None, str]:
        """The peer's mapping when the fast path can serve `info`, else None and why not."""
        offer = info.cuda_ipc
        if offer is None:
            return None, "the receiver offers no CUDA IPC handles (CPU memory, or turned off)"
        devices = {self._device_of.get(b) for b in layer_bases}
        if None in devices:
            return None, "this stage's KV is in CPU memory"
        if len(devices) != 1:
            return None, "this stage's KV spans several devices"
        device = devices.pop()
        assert device is not None
        if offer.node_id != node_id():
            return None, f"the receiver is on another node ({offer.node_id})"
        if offer.device_uuid not in self.backend.visible_device_uuids():
            return None, f"the receiver's GPU {offer.device_uuid} is not visible here"
        session = info.session_id
        # One lock over lookup, open and insert: two senders bootstrapping to a new peer at
        # once must end up sharing one mapping (and one liveness watch), not leaking one.
        with self._lock:
            if session in self._broken:
                return None, self._broken[session]
            mapping = self._mappings.get(session)
            fresh = mapping is None
            if mapping is None:
                same = offer.device_uuid == self.backend.device_uuid(device)
                mapping = PeerMapping(session, device, self.backend, same)
            if mapping.device != device:
                return None, "this stage's KV is on another device than the peer's mapping"
            try:
                mapping.open_all(offer.allocations)
            except IpcOpenError as exc:
                reason = f"CUDA IPC open failed ({exc})"
                log.warning("fast path to %s unavailable, using Mooncake: %s", session, reason)
                self._broken[session] = reason
                return None, reason
            if fresh:
                self._mappings[session] = mapping
                # A mapped peer is probed like one a transfer waits on: when it goes away,
                # the endpoint's probe hook drops the mapping (`drop_peer`).
                self._watch(session)
                log.info("fast path to %s: KV moves by CUDA IPC", session)
        return mapping, "same node, receiver's GPU visible"

    def route(
        self,
        mapping: PeerMapping,
        regions: list[KVLayerRegion],
        remote: dict[int, LayerAddress],
        page_nbytes: int,
    ) -> PageRoute | None:
        """The per-request path from `regions` to the peer's layers, or None where it cannot
        serve them (then every request takes the general path). Worked out once per peer and
        layer set; the receiver info it comes from is validated (each layer inside a mapped
        allocation), and it is checked again here against what is mapped and local."""
        if not mapping.same_device or not hasattr(self.backend, "launch_pages"):
            return None  # a peer GPU: copy engines, one memcpy per run (general path)
        try:
            theirs = [remote[r.layer] for r in regions]
        except KeyError:
            return None
        key = (
            page_nbytes,
            tuple((r.base_address, r.nbytes, r.kv_stride, r.page_stride) for r in regions),
            tuple((a.base, a.nbytes, a.kv_stride, a.page_stride) for a in theirs),
        )
        if key in mapping.routes:
            return mapping.routes[key]
        route = self._make_route(mapping, regions, theirs, page_nbytes)
        if route is not None:
            try:
                route.table = self.backend.prepare_route(route, mapping.device)
            except Exception:
                log.warning("fast path route to %s not prepared", mapping.session, exc_info=True)
                route = None
        mapping.routes[key] = route
        return route

    def _make_route(
        self,
        mapping: PeerMapping,
        regions: list[KVLayerRegion],
        theirs: list[LayerAddress],
        page_nbytes: int,
    ) -> PageRoute | None:
        if not regions or page_nbytes % 8:
            return None
        if any(r.page_stride != page_nbytes or r.kv_stride % 8 for r in regions):
            return None
        if any(a.page_stride != page_nbytes or a.kv_stride % 8 for a in theirs):
            return None
        bases = np.array([r.base_address for r in regions], np.int64)
        sizes = np.array([r.nbytes for r in regions], np.int64)
        i = np.searchsorted(self._local_bases, bases, side="right") - 1
        if (i < 0).any() or (bases + sizes > self._local_ends[np.maximum(i, 0)]).any():
            return None  # not all in this process's device KV
        remote_bases = np.array([a.base for a in theirs], np.int64)
        mapped, inside = mapping.translate(
            remote_bases, np.array([a.nbytes for a in theirs], np.int64)
        )
        if not inside.all():
            return None
        kv_here = np.array([r.kv_stride for r in regions], np.int64)
        kv_there = np.array([a.kv_stride for a in theirs], np.int64)
        src = np.stack([bases, bases + kv_here], 1).reshape(-1)  # rows: layer 0 K, V, layer 1..
        dst = np.stack([mapped, mapped + kv_there], 1).reshape(-1)
        if ((src | dst) & 7).any():
            return None

        def pages(nbytes: int, kv_stride: int) -> int:
            # Page p of K ends at p * size + size <= kv_stride; of V at kv_stride + ... <= nbytes.
            return min(kv_stride, nbytes - kv_stride) // page_nbytes

        return PageRoute(
            src_bases=src,
            dst_bases=dst,
            page_words=page_nbytes // 8,
            local_pages=min(pages(r.nbytes, r.kv_stride) for r in regions),
            remote_pages=min(pages(a.nbytes, a.kv_stride) for a in theirs),
        )

    def launch(self, route: PageRoute, runs: PageRuns, mapping: PeerMapping) -> IpcCopy:
        """Queue one request's runs on the caller's stream; the copy holds the mapping open."""
        if not mapping.acquire():
            raise IpcOpenError(f"CUDA IPC mapping of {mapping.session} closed: the peer went away")
        try:
            done = self.backend.launch_pages(route, runs, mapping.device)
        except BaseException:
            mapping.release()
            raise
        copy = IpcCopy(self, mapping, done)
        with self._lock:
            self._copies.add(copy)
        return copy

    def _forget(self, copy: IpcCopy) -> None:
        with self._lock:
            self._copies.discard(copy)

    def plan(self, segments: Segments, mapping: PeerMapping) -> tuple[Copies, Segments]:
        """The segments in device memory on both sides as copies, and the rest (for Mooncake)."""
        srcs = np.asarray(segments.srcs, np.int64)
        dsts = np.asarray(segments.dsts, np.int64)
        lengths = np.asarray(segments.lengths, np.int64)
        i = np.searchsorted(self._local_bases, srcs, side="right") - 1
        local = i >= 0
        if len(self._local_bases):
            local &= srcs + lengths <= self._local_ends[np.maximum(i, 0)]
        mapped, remote = mapping.translate(dsts, lengths)
        ok = local & remote
        rest = Segments()
        for k in np.flatnonzero(~ok).tolist():
            rest.add(segments.srcs[k], segments.dsts[k], segments.lengths[k])
        return Copies(srcs[ok], mapped[ok], lengths[ok]), rest

    # lifetime --------------------------------------------------------------------------------

    @property
    def mapped_sessions(self) -> set[str]:
        with self._lock:
            return set(self._mappings)

    def drop_peer(self, session: str) -> None:
        """The peer went away: unmap its memory (after copies in flight) and stop probing it."""
        with self._lock:
            mapping = self._mappings.pop(session, None)
        if mapping is not None:
            mapping.close()
            self._unwatch(session)
            log.info("fast path to %s closed: peer gone", session)

    def close(self) -> None:
        """Wait for the copies still running (nobody polled them to the end), then unmap."""
        with self._lock:
            copies = list(self._copies)
        for copy in copies:
            try:
                copy.wait()
            except Exception:
                log.warning("a CUDA IPC copy failed while closing", exc_info=True)
            copy.release()
        for session in list(self.mapped_sessions):
            self.drop_peer(session)


class IpcCopy:
    """One request's launched copy: finished when its event has passed; holds the peer's
    mapping open until released (after it finished, or at the endpoint's close)."""

    def __init__(self, path: CudaIpcPath, mapping: PeerMapping, done: Any) -> None:
        self._path = path
        self.mapping = mapping
        self.done = done
        self._released = False
        self._lock = threading.Lock()

    def landed(self) -> bool:
        """Every byte is in the peer's pages (never blocks)."""
        return self._path.backend.query(self.done)

    def wait(self) -> None:
        self._path.backend.wait(self.done)

    def release(self) -> None:
        """Give the mapping back (idempotent). Only once the copy finished or cannot run."""
        with self._lock:
            if self._released:
                return
            self._released = True
        self._path._forget(self)
        self.mapping.release()


class CudaIpcMover:
    """Writes one request's KV by IPC copy: launched from `send` over the route when there is
    one (`plan_pages`, `launch`), else the general way (`prepare`, `write` on the pool)."""

    name = "cuda_ipc"

    def __init__(
        self,
        path: CudaIpcPath,
        mapping: PeerMapping,
        write_rest: Callable[[str, list[int], list[int], list[int]], int],
        why: str,
        route: PageRoute | None = None,
        remote_pages: Iterable[int] = (),
    ) -> None:
        self.path = path
        self.mapping = mapping
        self.why = why
        self.route = route
        self._remote: np.ndarray | None = None
        self._remote_start = -1  # the receiver's pages run from here, one after another
        if route is not None:
            self._remote = np.asarray(list(remote_pages), np.int64)
            if len(self._remote) and (np.diff(self._remote) == 1).all():
                self._remote_start = int(self._remote[0])
        self._write_rest = write_rest

    def plan_pages(self, local_pages: list[int]) -> PageRuns | None:
        """The request's page runs over the route (`plan_runs`), or None: the general path."""
        route = self.route
        if route is None or self._remote is None:
            return None
        n = len(local_pages)
        if self._remote_start >= 0 and 0 < n <= len(self._remote):
            # The usual case, without numpy: both sides one run (checked at C speed).
            first = local_pages[0]
            if (
                first >= 0
                and first + n <= route.local_pages
                and self._remote_start + n <= route.remote_pages
                and local_pages[-1] == first + n - 1
                and (local_pages if type(local_pages) is list else list(local_pages))
                == route.page_numbers(first, n)
            ):
                words = route.page_words
                return PageRuns((first * words, self._remote_start * words, n * words))
        return plan_runs(route, local_pages, self._remote)

    def launch(self, runs: PageRuns) -> IpcCopy | None:
        """Queue `runs` behind the KV on the caller's stream; None when there is nothing."""
        if not len(runs):
            return None
        assert self.route is not None
        return self.path.launch(self.route, runs, self.mapping)

    def prepare(self) -> Any:
        """On the thread that queued the KV: mark where on its stream the KV is complete."""
        return self.path.backend.record(self.mapping.device)

    def write(self, session: str, segments: Segments, ticket: Any) -> int:
        """Copy, and return once every byte has landed (0), or raise with the reason."""
        if not self.mapping.acquire():
            raise IpcOpenError(f"CUDA IPC mapping of {session} closed: the peer went away")
        try:
            copies, rest = self.path.plan(segments, self.mapping)
            backend = self.path.backend
            done = (
                backend.launch(copies, ticket, self.mapping.device, not self.mapping.same_device)
                if len(copies)
                else None
            )
            try:
                # The first-token record (CPU memory) goes by Mooncake while the copies run;
                # any GPU bytes among the rest only once the KV is computed.
                if len(rest):
                    if ticket is not None:
                        backend.wait(ticket)
                    return self._write_rest(session, rest.srcs, rest.dsts, rest.lengths)
                return 0
            finally:
                if done is not None:
                    backend.wait(done)  # every byte landed before the write counts as done
        finally:
            self.mapping.release()
