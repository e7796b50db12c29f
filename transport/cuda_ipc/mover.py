"""An endpoint's same-node fast path (`CudaIpcPath`: what it exports, which peers it has mapped,
how a request's pages get there) and the byte mover a sender gets for one peer over it
(`CudaIpcMover`), with one launched copy (`IpcCopy`)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch

from engine.kv_cache import KVLayerRegion, PagedKVCache
from transport.cuda_ipc.backend import IpcBackend
from transport.cuda_ipc.driver import IpcOpenError, node_id
from transport.cuda_ipc.kernels import Copies
from transport.cuda_ipc.mapping import PeerMapping
from transport.cuda_ipc.routes import PageRoute, PageRuns, plan_runs
from transport.receiver_info import CudaIpcInfo, IpcAllocation, LayerAddress, ReceiverInfo
from transport.segments import Segments

log = logging.getLogger(__name__)


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
    one (`plan_pages`, `launch`), else the general way (`prepare`, `write` on the pool).

    `prepare` and `write` are the `KVMover` every mover is. `plan_pages` and `launch` are this
    mover's alone: no other can start a write without the pool, so the sender asks for them
    only when its mover is this class.
    """

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
