"""The same-node fast path: KV pages move GPU to GPU through CUDA IPC instead of Mooncake tcp.

A decode process exports each device allocation that holds its KV once (`cudaIpcGetMemHandle`)
and offers the handles in its receiver info, with the node it runs on and its GPU's UUID. A
prefill stage on the same node that can see that GPU opens the handles once per peer and
copies its page runs device to device on a side stream, after the KV it computed (an event of
the caller's stream), waiting for the copy to finish before the write counts as done. The runs
are the tcp path's segments; all of them go in one kernel launch (a table of source, mapped
destination and length), so a request costs one launch however its pages are scattered.

This module only moves bytes and decides whether it can: the sender's state machine,
validation, timeouts and the first-token record (CPU memory, so still Mooncake) are the tcp
path's. Whenever the peer is elsewhere, the memory is CPU memory, or an open fails, the sender
gets the Mooncake mover instead. Mappings stay open per peer while it answers probes; a peer
whose probe fails (it went away) or the endpoint's close unmaps them, after any copy still
using them has finished.
"""

from __future__ import annotations

import ctypes
import glob
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache
from typing import Any, Protocol

import numpy as np
import torch

from engine.kv_cache import PagedKVCache
from transport.receiver_info import CudaIpcInfo, IpcAllocation, ReceiverInfo
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


class CudaRuntime:
    """The few runtime/driver entry points IPC needs, from the libraries torch already loaded."""

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

    def _check(self, rc: int, what: str) -> None:
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
        self._check(self._rt.cudaIpcGetMemHandle(ctypes.byref(handle), base), "cudaIpcGetMemHandle")
        return bytes(handle.reserved)

    def open_mem_handle(self, raw: bytes) -> int:
        ptr = ctypes.c_void_p()
        handle = _IpcMemHandle.from_buffer_copy(raw)
        rc = self._rt.cudaIpcOpenMemHandle(ctypes.byref(ptr), handle, _LAZY_ENABLE_PEER_ACCESS)
        self._check(rc, "cudaIpcOpenMemHandle")
        return int(ptr.value or 0)

    def close_mem_handle(self, ptr: int) -> None:
        self._check(self._rt.cudaIpcCloseMemHandle(ptr), "cudaIpcCloseMemHandle")

    def memcpy_async(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        """cudaMemcpyAsync with cudaMemcpyDefault: unified addressing finds both devices."""
        rc = self._rt.cudaMemcpyAsync(dst, src, nbytes, _MEMCPY_DEFAULT, stream)
        self._check(rc, "cudaMemcpyAsync")


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


_BLOCK = 4096  # elements per program: 32 KiB of 8-byte elements
_MAX_PARTS = 65535  # the grid's second dimension: runs up to 2 GiB (one layer's K is far less)


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


class CudaIpc:
    """CUDA IPC through the runtime torch loaded; copies run on one side stream per device."""

    def __init__(self) -> None:
        self._runtime: CudaRuntime | None = None
        self._streams: dict[int, torch.cuda.Stream] = {}
        self._kernel_ok = True
        self._lock = threading.Lock()

    @property
    def runtime(self) -> CudaRuntime:
        with self._lock:
            if self._runtime is None:
                self._runtime = CudaRuntime()
            return self._runtime

    @property
    def kernel_in_use(self) -> bool:
        """False once the batched copy kernel failed here and copies went one memcpy a run."""
        return self._kernel_ok

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
        """Compile the copy kernel now (about half a second), not on the first request."""
        scratch = torch.zeros(64, dtype=torch.int64, device=device)
        src, dst = scratch.data_ptr(), scratch.data_ptr() + 256
        copies = Copies(*(np.array([v], np.int64) for v in (src, dst, 256)))
        self.wait(self.launch(copies, None, device, peer=False))

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

    def wait(self, done: torch.cuda.Event) -> None:
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
        self._users = 0
        self._closed = False
        self._lock = threading.Lock()

    @property
    def closed(self) -> bool:
        return self._closed

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
        for session in list(self.mapped_sessions):
            self.drop_peer(session)


class CudaIpcMover:
    """Writes one request's segments: device runs by IPC copy, the rest by Mooncake."""

    name = "cuda_ipc"

    def __init__(
        self,
        path: CudaIpcPath,
        mapping: PeerMapping,
        write_rest: Callable[[str, list[int], list[int], list[int]], int],
        why: str,
    ) -> None:
        self.path = path
        self.mapping = mapping
        self.why = why
        self._write_rest = write_rest

    def prepare(self) -> Any:
        """On the thread that computed the KV: mark where on its stream the KV is complete."""
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
                # The first-token record (CPU memory) goes by Mooncake while the copies run.
                if len(rest):
                    return self._write_rest(session, rest.srcs, rest.dsts, rest.lengths)
                return 0
            finally:
                if done is not None:
                    backend.wait(done)  # every byte landed before the write counts as done
        finally:
            self.mapping.release()
