"""The Mooncake `TransferEngine` of a process: set-up, registration, writes, repair, shutdown.

Everything else in `transport/` goes through this owner, so there is one place that knows the
handshake mode (P2P: peers exchange metadata directly, no etcd), the protocol, which memory is
registered, and the thread pool on which KV writes run (a scheduler loop never blocks on the
network). It also picks each sender's byte mover: Mooncake, or the same-node CUDA IPC fast path
(transport/cuda_ipc/) when the receiver's GPU memory can be mapped here.

Writes go to Mooncake in bounded batches, and a failed write gets the path to its peer checked
before the next write to it: Mooncake's tcp transport can wedge the path to one peer for good
(NOTES.md), and then that peer is written to through a fresh engine of its own. Peers address
this process by the first engine's session only.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

import torch

from engine.kv_cache import KVLayerRegion, PagedKVCache
from transport.config import TransportConfig
from transport.cuda_ipc.backend import CudaIpc, IpcBackend
from transport.cuda_ipc.mover import CudaIpcMover, CudaIpcPath
from transport.faults import INJECTED_RC, TransportFaults
from transport.liveness import PeerLiveness
from transport.metadata import MetadataSlots
from transport.receiver_info import CudaIpcInfo, ReceiverInfo
from transport.segments import Segments

log = logging.getLogger(__name__)

# Engines whose path to a peer wedged, kept until `close`: destroying one holds the GIL for about
# a second (measured), which would stall the stage's scheduler loop. Past this many the oldest goes.
_MAX_RETIRED_ENGINES = 4


class TransportError(RuntimeError):
    """Mooncake could not be set up or refused an operation on our own side."""


def _load_transfer_engine() -> Any:
    try:
        from mooncake.engine import TransferEngine
    except ImportError as exc:  # the wheel is there but libibverbs1 is not, or no wheel at all
        raise TransportError(
            f"cannot import the Mooncake transfer engine ({exc}); install the "
            "'mooncake-transfer-engine' wheel for your platform and Debian's libibverbs1"
        ) from exc
    return TransferEngine


class KVMover(Protocol):
    """How one sender's bytes reach its receiver; the sender's state machine is the same.

    Only what every mover does for real, because every request can go this way: a ticket taken
    in `send`, then the request's segments written on the transfer pool. Starting the write
    from `send` itself, with no pool hop, is the CUDA IPC mover's alone (`CudaIpcMover`:
    `plan_pages`, `launch`); the sender asks for it where it uses it, so no other mover has
    to answer for it.
    """

    name: str  # which path carries the bytes, in stats and logs
    why: str  # why this mover was chosen, for logs and tests

    def prepare(self) -> Any:
        """Called by `send` on the thread and stream that queued the KV, maybe before the GPU
        has computed it: a ticket `write` waits for before any byte of GPU memory is read
        (None: nothing to wait for, e.g. KV in CPU memory)."""
        ...

    def write(self, session: str, segments: Segments, ticket: Any) -> int:
        """Move `segments` to `session` and return once they landed: 0, or a negative rc.
        Runs on the transfer pool, so it may block."""
        ...


class MooncakeMover:
    """The segments as Mooncake batch writes (tcp, rdma or nvlink, per the config).

    Always on the pool, never launched from `send`: a batch write blocks until it landed.
    """

    name = "mooncake"

    def __init__(
        self, endpoint: TransferEndpoint, why: str, device: torch.device | None = None
    ) -> None:
        self.endpoint = endpoint
        self.why = why
        self.device = device  # where the KV is, when in GPU memory

    def prepare(self) -> torch.cuda.Event | None:
        """GPU memory: an event after the KV queued so far on the caller's stream (a stage
        sends before its forward has run on the GPU); Mooncake reads only after it passed."""
        if self.device is None:
            return None
        return torch.cuda.current_stream(self.device).record_event()

    def write(self, session: str, segments: Segments, ticket: Any) -> int:
        if ticket is not None:
            ticket.synchronize()
        return self.endpoint.write(session, segments.srcs, segments.dsts, segments.lengths)


class PendingWrite:
    """One Mooncake write submitted without waiting (the fast path's first-token record).

    `poll()` never blocks: None while it runs, then 0 once it landed or Mooncake's negative rc.
    Mooncake frees the batch when it reports an end, so the end is kept and asked only once.
    """

    def __init__(
        self,
        engine: Any,
        batch: int | None,
        error: str | None = None,
        on_failure: Callable[[], None] | None = None,
    ) -> None:
        self._engine = engine
        self._batch = batch
        self._rc: int | None = -1 if batch is None else None
        self.error = error
        self._on_failure = on_failure  # the endpoint's: check the peer's path before its next write
        self._lock = threading.Lock()

    def poll(self) -> int | None:
        with self._lock:
            if self._rc is None:
                status = self._engine.transfer_check_status(self._batch)
                if status == 1:
                    self._rc = 0
                elif status != 0:
                    self._rc = status if status < 0 else -1
                    self.error = f"first-token record rc={status}"
                    if self._on_failure is not None:
                        self._on_failure()
            return self._rc

    def wait(self, timeout_s: float) -> int | None:
        """Block (on a pool thread) until it ended or `timeout_s` passed (then None)."""
        deadline = time.monotonic() + timeout_s
        while (rc := self.poll()) is None and time.monotonic() < deadline:
            time.sleep(0.001)
        return rc


class TransferEndpoint:
    """This process's Mooncake session: what peers address and what they may write into."""

    def __init__(
        self, config: TransportConfig | None = None, *, ipc_backend: IpcBackend | None = None
    ) -> None:
        """`ipc_backend` replaces CUDA for the fast path (tests on machines without a GPU)."""
        self.config = config or TransportConfig()
        # Mooncake's own per-transfer timeout bounds how long a write to a silent peer can
        # hold a pool thread; it is read from the environment when the engine starts.
        os.environ.setdefault("MC_TRANSFER_TIMEOUT", str(math.ceil(self.config.transfer_timeout_s)))
        self._hostname = self.config.resolved_hostname()
        self._engine = self._start_engine()
        self.session_id = f"{self._hostname}:{self._engine.get_rpc_port()}"
        self._registered: dict[int, int] = {}  # address -> nbytes
        self._kv_devices: dict[int, torch.device] = {}  # layer base -> its GPU
        self._lock = threading.Lock()
        self._engines_lock = threading.Lock()  # registering and rebuilding a path, one at a time
        # Peers written to through an engine of their own (their path on ours wedged), engines
        # retired from that, and peers whose last write failed, with an address of theirs
        # the next write's repair may read from.
        self._writers: dict[str, Any] = {}
        self._retired: list[Any] = []
        self._needs_repair: dict[str, int] = {}
        self._probes: dict[str, Future[int]] = {}
        self.repairs = 0  # paths checked after a failed write
        self.rebuilds = 0  # of which were wedged and moved to a fresh engine
        self.on_repair: Callable[[], None] | None = None  # told of each repair (a metric)
        self.faults = TransportFaults()  # fault hook for tests and chaos soaks: off by default
        self.metadata = MetadataSlots(self.config.metadata_slots)
        self.register(self.metadata.base_address, self.metadata.nbytes)
        self._scratch = torch.zeros(64, dtype=torch.uint8)  # a repair's one-byte read lands here
        self.register(self._scratch.data_ptr(), self._scratch.numel())
        self._peer_queues: dict[str, deque[Callable[[], None]]] = {}
        self._pool = ThreadPoolExecutor(self.config.send_threads, thread_name_prefix="kv-send")
        self.cuda_ipc: CudaIpcPath | None = None
        self.liveness = PeerLiveness(self._probe, self.config.liveness_interval_s)
        if self.config.cuda_ipc:
            self.cuda_ipc = CudaIpcPath(
                ipc_backend or CudaIpc(), self.liveness.watch, self.liveness.unwatch
            )
        self._closed = False
        log.info("transfer endpoint up", extra={"session": self.session_id})

    def _start_engine(self) -> Any:
        engine = _load_transfer_engine()()
        rc = engine.initialize(
            self._hostname, "P2PHANDSHAKE", self.config.protocol, self.config.device_names
        )
        if rc != 0:
            raise TransportError(
                f"Mooncake initialize({self._hostname!r}, {self.config.protocol!r}) failed "
                f"with rc={rc}"
            )
        return engine

    def register(self, address: int, nbytes: int) -> None:
        """Register `[address, address + nbytes)` so peers may write into it (and we read from it)."""
        with self._engines_lock:
            with self._lock:
                engines = [self._engine, *self._writers.values()]
            for engine in engines:
                rc = engine.register_memory(address, nbytes)
                if rc != 0:
                    raise TransportError(
                        f"Mooncake register_memory({address:#x}, {nbytes}) rc={rc}"
                    )
            with self._lock:
                self._registered[address] = nbytes

    def unregister(self, address: int) -> None:
        """Undo `register(address, ...)` before the memory is freed (Mooncake refuses a later
        registration that overlaps one still held). Unknown addresses are ignored."""
        with self._engines_lock:
            with self._lock:
                if self._registered.pop(address, None) is None or self._closed:
                    return
                engines = [self._engine, *self._writers.values()]
            for engine in engines:
                engine.unregister_memory(address)

    def register_cache(self, cache: PagedKVCache) -> None:
        """Register every layer of a KV cache (CPU or GPU memory alike).

        GPU caches are also exported for the fast path: peers on this node may map them.
        """
        for region in cache.regions():
            self.register(region.base_address, region.nbytes)
        if cache.layers and cache.layers[0].is_cuda:
            with self._lock:
                for region in cache.regions():
                    self._kv_devices[region.base_address] = cache.layers[0].device
        if self.cuda_ipc is not None:
            self.cuda_ipc.add_cache(cache)

    def _kv_device(self, regions: list[KVLayerRegion]) -> torch.device | None:
        """The GPU that holds `regions` (registered with `register_cache`), or None."""
        with self._lock:
            devices = {self._kv_devices.get(r.base_address) for r in regions}
        return devices.pop() if len(devices) == 1 else None

    def cuda_ipc_offer(self, regions: list[KVLayerRegion]) -> CudaIpcInfo | None:
        """The fast-path part of receiver info for `regions`, when they can be mapped."""
        if self.cuda_ipc is None:
            return None
        return self.cuda_ipc.offer([r.base_address for r in regions])

    def mover_for(self, info: ReceiverInfo, regions: list[KVLayerRegion]) -> KVMover:
        """The byte mover for writing `regions` to the receiver `info` describes (validated).

        CUDA IPC when the receiver is on this node, both sides' KV is in GPU memory and its
        handles open here; Mooncake in every other case.
        """
        device = self._kv_device(regions)
        if self.cuda_ipc is None:
            return MooncakeMover(self, "fast path turned off", device)
        mapping, why = self.cuda_ipc.select(info, [r.base_address for r in regions])
        if mapping is None:
            return MooncakeMover(self, why, device)
        by_layer = {a.layer: a for a in info.layers}
        route = self.cuda_ipc.route(mapping, regions, by_layer, info.layout.page_nbytes)
        return CudaIpcMover(self.cuda_ipc, mapping, self.write, why, route, info.page_indices)

    def write(self, session: str, srcs: list[int], dsts: list[int], lengths: list[int]) -> int:
        """Write the segments to `session`, blocking: 0 once all landed, else the negative rc of
        the batch that failed (none after it is submitted).

        They go in Mooncake batches of at most `config.max_segments_per_write`, in order, each
        once the one before landed, so the last segment (the first-token record) lands last.
        A write to a peer whose last write failed first repairs the path to it (`_repair`).
        """
        self._repair_if_needed(session)
        engine = self._writer(session)
        step = self.config.max_segments_per_write
        for start in range(0, len(srcs), step):
            stop = start + step
            if self.faults.active and self.faults.take_write_failure(session):
                rc = INJECTED_RC
            else:
                try:
                    rc = engine.batch_transfer_sync_write(
                        session, srcs[start:stop], dsts[start:stop], lengths[start:stop]
                    )
                except Exception:
                    self._note_failure(session, dsts[start])
                    raise
            if rc != 0:
                self._note_failure(session, dsts[start])
                return rc
        return 0

    def write_async(self, session: str, src: int, dst: int, length: int) -> PendingWrite:
        """Submit one write to `session` without waiting for it (never raises)."""
        engine = self._writer(session)

        def failed() -> None:
            self._note_failure(session, dst)

        if self.faults.active and self.faults.unreachable(session):
            failed()
            return PendingWrite(engine, None, "first-token record not submitted (unreachable)")
        try:
            batch = engine.transfer_submit_write(session, src, dst, length)
        except Exception as exc:
            failed()
            return PendingWrite(engine, None, f"first-token record not submitted ({exc!r})")
        if not 0 < batch < 2**63:  # 0 or (uint64) -1: the submit failed
            failed()
            return PendingWrite(engine, None, "first-token record not submitted")
        return PendingWrite(engine, batch, on_failure=failed)

    def reachable(self, session: str, timeout_s: float = 1.0) -> bool:
        """Whether `session` answers one Mooncake probe within `timeout_s`: for readiness
        checks. Never raises; False once the endpoint is closed.

        A probe to a frozen peer blocks about 60 s inside Mooncake, so it runs on a thread of
        its own, one per peer at a time: callers while it hangs wait on the same probe.
        """
        if self._closed:
            return False
        with self._lock:
            probe = self._probes.get(session)
            started = probe is None
            if probe is None:
                probe = self._probes[session] = Future()
        if started:
            threading.Thread(
                target=self._run_probe, args=(session, probe), name="kv-probe", daemon=True
            ).start()
        try:
            return probe.result(timeout_s) == 0
        except Exception:  # the probe is still hanging
            return False

    def _run_probe(self, session: str, probe: Future[int]) -> None:
        try:
            rc = self._probe(session)
        except Exception:
            rc = -1
        with self._lock:
            self._probes.pop(session, None)
        probe.set_result(rc)

    # -- repair ------------------------------------------------------------------------------

    def _writer(self, session: str) -> Any:
        """The engine that writes to `session`: ours, unless its path there was rebuilt."""
        with self._lock:
            return self._writers.get(session, self._engine)

    def _note_failure(self, session: str, remote: int) -> None:
        """A write to `session` failed: its path is repaired before the next write to it uses
        it, and soon on the pool in any case (a peer only the fast path's records reach)."""
        with self._lock:
            first = session not in self._needs_repair
            self._needs_repair[session] = remote
        if first and not self._closed:
            self.submit(session, lambda: self._repair_if_needed(session))

    def _repair_if_needed(self, session: str) -> None:
        with self._lock:
            remote = self._needs_repair.pop(session, None)
        if remote is None or self._closed:
            return
        try:
            repaired = self._repair(session, remote)
        except Exception:  # e.g. a fresh engine would not start: try again next time
            log.exception("repairing the write path to a peer failed", extra={"session": session})
            repaired = False
        if not repaired:
            with self._lock:
                self._needs_repair.setdefault(session, remote)

    def _repair(self, session: str, remote: int) -> bool:
        """Make the path to `session` usable after a failed write; False when the peer does not
        answer a probe (nothing here to repair: the next write checks again).

        Mooncake's tcp transport has one queue per (engine, peer). After a batch overflows it
        (queue-full), that queue can stop moving for good: every write and read to the peer
        fails (after 1 s, or at once) while the peer answers probes and takes writes from any
        other engine. Re-registering memory does not help and the Python binding cannot reset
        it, so a path that fails a one-byte read from the peer moves to a fresh engine.
        """
        if not self.reachable(session):
            log.warning(
                "peer unreachable: its write path is checked again before the next write",
                extra={"session": session},
            )
            return False
        engine = self._writer(session)
        with self._lock:
            self.repairs += 1
        if self.on_repair is not None:
            self.on_repair()
        if engine.batch_transfer_sync_read(session, [self._scratch.data_ptr()], [remote], [1]) == 0:
            log.info("write path to peer works after a failed write", extra={"session": session})
            return True
        with self._engines_lock:
            fresh = self._start_engine()
            with self._lock:
                regions = list(self._registered.items())
            for address, nbytes in regions:
                rc = fresh.register_memory(address, nbytes)
                if rc != 0:
                    raise TransportError(
                        f"Mooncake register_memory({address:#x}, {nbytes}) rc={rc} (rebuild)"
                    )
            with self._lock:
                old = self._writers.get(session)
                self._writers[session] = fresh
                self.rebuilds += 1
                if old is not None:
                    self._retired.append(old)
                past_cap = self._retired[:-_MAX_RETIRED_ENGINES]
                del self._retired[:-_MAX_RETIRED_ENGINES]
        log.warning(
            "write path to peer wedged: rebuilt on a fresh Mooncake engine",
            extra={"session": session, "rebuilds": self.rebuilds},
        )
        del old, past_cap  # engines past the cap go here, outside the locks
        return True

    def run_soon(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the transfer pool, outside any peer's order (inline once it is shut)."""
        try:
            self._pool.submit(fn)
        except RuntimeError:  # shut down: the endpoint is closing
            fn()

    def submit(self, session: str, fn: Callable[[], None]) -> None:
        """Run the write `fn` to `session` on the transfer pool, after earlier ones to it.

        Writes to one peer run one at a time, in submission order: concurrent writes over one
        connection only contend (measured: 32 small requests to one peer ran at 0.4-0.6x of
        sequential with 2-4 parallel writers), while writes to different peers overlap.
        """
        with self._lock:
            queue = self._peer_queues.setdefault(session, deque())
            queue.append(fn)
            if len(queue) > 1:
                return  # a drainer for this peer is already running
        self._pool.submit(self._drain, session)

    def _drain(self, session: str) -> None:
        while True:
            with self._lock:
                fn = self._peer_queues[session][0]
            try:
                fn()
            except Exception:  # a write reports its own failure; never stall the queue
                log.exception("transfer job raised", extra={"session": session})
            with self._lock:
                queue = self._peer_queues[session]
                queue.popleft()
                if not queue:
                    del self._peer_queues[session]
                    return

    def _probe(self, session: str) -> int:
        if self.faults.active and self.faults.unreachable(session):
            rc = INJECTED_RC
        else:
            rc = self._engine.send_probe(session)
        if rc != 0 and self.cuda_ipc is not None:
            self.cuda_ipc.drop_peer(session)  # the peer went away: unmap its memory
        return rc

    def close(self) -> None:
        """Stop probing, let running writes finish, unmap peers, unregister memory. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.liveness.close()
        self._pool.shutdown(wait=True)
        if self.cuda_ipc is not None:
            self.cuda_ipc.close()
        with self._lock:
            registered, self._registered = list(self._registered), {}
            spare = [*self._writers.values(), *self._retired]
            self._writers, self._retired = {}, []
        if registered:
            self._engine.batch_unregister_memory(registered)
        del spare  # the engines of rebuilt paths go here, each holding the GIL about a second
        log.info("transfer endpoint closed", extra={"session": self.session_id})
