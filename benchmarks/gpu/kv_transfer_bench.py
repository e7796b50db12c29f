"""One request's KV, GPU to GPU across two processes: CUDA IPC fast path vs Mooncake tcp vs copy.

Shape: a Qwen2-1.5B-like KV cache (28 layers, 2 KV heads of 128, bfloat16, 16-token pages: 8 KiB
per page of K or V, 28 KiB per token over all layers), requests of 2k and 16k tokens. The prefill
side is this process (one `KVSender` holding every layer, the project's real sender); the decode
side is a spawned process with its cache on the same GPU (tests/transport/peer.py with
`device="cuda"`, the real `KVReceiver`). Timed:

- `fast path`: the sender with the CUDA IPC mover. `write` = `send->Success`: from entering
  `send` (which plans the runs, launches the copy on this thread's stream and submits the
  first-token record) to the `poll` that reports Success, polling back to back (a scheduler
  polls once per iteration instead), with the GPU idle when `send` is called. `send_ms`: the
  host time inside `send`. Last stage (KV + first-token record) and a middle stage (KV only).
  No probes are installed during these runs.
- `behind a forward` (`added_*`): what the transfer adds when `send` is called right after a
  forward was queued, as the prefill stage calls it: the copy queues behind the compute on the
  same stream, so the host part of `send` overlaps the GPU's work as far as the GPU still has
  work queued. A stand-in forward is queued (`Forward`: model-sized, the MLP matmuls of
  Qwen2-1.5B over the request's tokens, GPU-bound; `hostbound_*`: a light one whose launches
  take about as long as its GPU work), then either `send` + polling to Success, or (forward
  only) an event polled back to back; the two kinds alternate, and `added` = the difference of
  their medians (each from queuing the forward to done; noisy where the forward is long).
  `added_GB_s` = bytes / added. Per request and less noisy (`*_done_to_success_ms`): an event
  recorded after the forward, then `send`, then polling the event and the sender back to back:
  from the first poll that sees the forward done to Success. Also the GPU's view
  (`*_gpu_ms`): time between that event and one recorded after `send` on the stream (the copy
  plus any gap where the GPU waited for the host's launch).
- `stage order` (`stage_order_*`): the order the stage actor uses: a model-sized forward
  queued, `send` on a side stream behind it, then `out.cpu()`; `stage_order_ms` is the GPU's
  time from the forward's end to the copy's end (the headline's `stage order` flow, whose
  target figure this is), `stage_order_copy_ms` the same for a `copy_` in the place of `send`,
  `*_after_wait_ms` the host's time from `out.cpu()`'s return to Success.
- `mooncake tcp`: the same sender with the fast path off (Mooncake tcp on loopback, written on
  the pool; polled every 20 us so the pool thread gets the GIL).
- `device copy`: in this process, one `copy_` of as many contiguous bytes (GPU time: the
  ceiling), and the fast path's own page copy of the request's runs (GPU time between events,
  and host time from launch to done).
- a breakdown of the fast path's `send` (separate KV-only runs with timers on each call, which
  add ~1-3 us each): planning the runs (`plan_ms`), the launch (`launch_ms`: slot, run table,
  graph launch, event), the record's submit (`record_ms`, last stage only), `wait_ms` =
  write - send of the probe-free runs; `cold_*_ms`: each call inside the launch in this flow,
  `hot_*_ms` the same calls in a loop of launches alone (the last row); `busy_*`: KV-only writes
  with this thread kept busy for 1 ms before `send` instead of coming from a sleep on the pipe.

Target: fast path >= 0.5x the one-copy bandwidth, in the stage's order
(`stage_order_vs_copy`). Bandwidth counts bytes moved once (a copy reads and writes each: 1.5 TB/s here is 3.0 TB/s read+write). Pages are checked by
checksum after the first transfer of each kind. Also probed: whether host memory can be
exported with CUDA IPC (the first-token slot is host memory). The probes only attach to calls
the code has, so this file also measures the previous code (`.before/`) the same way.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import random
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial

os.environ.setdefault("GLOG_minloglevel", "2")

import numpy as np
import torch

from benchmarks.report import write_report
from engine.kv_cache import PagedKVCache
from tests.transport.peer import CacheShape, DecodePeer, PrefillStage, page_checksums
from transport import FirstToken, KVPoll, KVSender, TransportConfig
from transport.cuda_ipc import backend as ipc_backend
from transport.cuda_ipc.backend import CudaIpc
from transport.cuda_ipc.kernels import Copies
from transport.cuda_ipc.mover import CudaIpcMover
from transport.cuda_ipc.routes import PageRoute, plan_runs
from transport.receiver_info import LayerAddress
from transport.segments import kv_segments
from transport.streams import behind_current_stream

SHAPE = CacheShape(
    num_layers=28, num_pages=1024 + 64, page_size=16, num_kv_heads=2, head_dim=128, dtype="bfloat16"
)
OFFSET = 32  # decode pages start here: runs are contiguous on both sides, just not aligned


def _wait(sender: KVSender, busy: bool, timeout: float = 120.0) -> None:
    """Poll until done: back to back (`busy`: the fast path needs no other thread), or every
    20 us (a write on the pool needs the GIL now and then)."""
    deadline = time.monotonic() + timeout
    while (state := sender.poll()) not in (KVPoll.Success, KVPoll.Failed):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{sender.rid} stuck in {state.name}")
        if not busy:
            time.sleep(20e-6)
    if state is KVPoll.Failed:
        raise RuntimeError(sender.failure_reason)


class Prefill(PrefillStage):
    """This process's side: a stage holding every layer on the GPU, sending toward `peer`."""

    def __init__(self, peer: DecodePeer, config: TransportConfig, tag: str) -> None:
        super().__init__(SHAPE, config, device="cuda")
        self.peer = peer
        self.tag = tag
        self._n = 0

    def prepare(self, remote: list[int], last: bool) -> tuple[KVSender, FirstToken | None]:
        """A sender with the decode side's receiver info for `remote`, waiting for input."""
        self._n += 1
        sender = self.sender_to(self.peer, f"{self.tag}{self._n}", self._n, remote, is_last=last)
        pages = len(remote)
        token = FirstToken(self._n, 1, 0.0, pages * SHAPE.page_size) if last else None
        return sender, token

    def transfer(
        self, local: list[int], remote: list[int], last: bool, spin_s: float = 0.0
    ) -> tuple[KVSender, float, float]:
        """One request; returns the finished sender, its send->Success and in-send seconds.

        `spin_s`: keep this thread busy that long right before `send` (as a scheduler loop
        is), instead of coming straight from sleeping on the pipe to the decode process."""
        sender, token = self.prepare(remote, last)
        busy = sender.mover is not None and sender.mover.name == "cuda_ipc"
        start = time.perf_counter()
        while time.perf_counter() - start < spin_s:
            pass
        start = time.perf_counter()
        sender.send(local, token)
        sent = time.perf_counter()
        _wait(sender, busy)
        wall = time.perf_counter() - start
        self.peer.settle(sender.rid, True)  # frees the receiver (a middle stage's lacks the record)
        return sender, wall, sent - start

    def behind_forward(
        self, forward: Forward, local: list[int], remote: list[int], last: bool, send: bool
    ) -> float:
        """Queue `forward`, then `send` and poll to Success (or, if not `send`, poll an event
        after the forward); returns seconds from queuing the forward to done."""
        sender, token = self.prepare(remote, last)
        start = time.perf_counter()
        forward.queue(local)
        if send:
            sender.send(local, token)
            _wait(sender, busy=True)
        else:
            end = torch.cuda.Event()
            end.record()
            while not end.query():
                pass
        wall = time.perf_counter() - start
        if send:
            self.peer.settle(sender.rid, True)
        else:
            sender.abort("forward only")
            self.peer.settle(sender.rid, False, "forward only")
        return wall

    def gpu_behind_forward(
        self, forward: Forward, local: list[int], remote: list[int], last: bool
    ) -> tuple[float, float]:
        """Queue `forward`, record an event, `send`, and poll the event then the sender back to
        back: seconds from the forward's completion (the first poll that sees the event
        passed) to Success, and the GPU's seconds between the forward's end and the copy's."""
        sender, token = self.prepare(remote, last)
        forward.queue(local)
        after_forward = torch.cuda.Event(enable_timing=True)
        after_copy = torch.cuda.Event(enable_timing=True)
        after_forward.record()
        sender.send(local, token)
        after_copy.record()
        while not after_forward.query():
            if sender.poll() is KVPoll.Failed:
                raise RuntimeError(sender.failure_reason)
        forward_done = time.perf_counter()
        _wait(sender, busy=True)
        success = time.perf_counter()
        after_copy.synchronize()
        self.peer.settle(sender.rid, True)
        return success - forward_done, after_forward.elapsed_time(after_copy) / 1e3

    def copy_in_flow(self, copy: OneCopy, remote: list[int]) -> float:
        """One `copy_` in the place of `send`: after the same bootstrap (a pipe round trip to
        the decode process, its receiver info validated, a new sender), launched and polled to
        its end the same way. Seconds from the launch to the poll that sees it done: what any
        GPU work launched from that state costs, as a reference for the fast path's write."""
        sender, _ = self.prepare(remote, False)
        end = torch.cuda.Event()
        start = time.perf_counter()
        copy()
        end.record()
        while not end.query():
            pass
        wall = time.perf_counter() - start
        self._let_go(sender, reference=True)
        return wall

    def _let_go(self, sender: KVSender, reference: bool) -> None:
        """Free the decode side's receiver: settled as delivered, or (a reference copy ran in
        the place of `send`) the sender aborted and the receiver failed."""
        if reference:
            sender.abort("reference only")
            self.peer.settle(sender.rid, False, "reference only")
        else:
            self.peer.settle(sender.rid, True)

    def after_sync(
        self,
        forward: Forward,
        local: list[int],
        remote: list[int],
        last: bool,
        reference: OneCopy | None = None,
    ) -> tuple[float, float]:
        """The stage actor's old order: queue `forward`, wait for it as the stage did (a middle
        stage's `out.cpu()`; the last stage's sampling is a sync too), then `send` and poll back
        to back to Success; with `reference`, that copy is launched in the place of `send`
        instead and polled to its end (the same flow's bare launch). Returns the seconds from
        `send` (or the launch) to done, and the GPU's seconds between events recorded on the
        stream right before and after it (so the wait for the host's launch included)."""
        sender, token = self.prepare(remote, last)
        forward.queue(local)
        forward.sync()
        before = torch.cuda.Event(enable_timing=True)
        after = torch.cuda.Event(enable_timing=True)
        start = time.perf_counter()
        before.record()
        if reference is None:
            sender.send(local, token)
            after.record()
            _wait(sender, busy=True)
        else:
            reference()
            after.record()
            while not after.query():
                pass
        wall = time.perf_counter() - start
        after.synchronize()
        self._let_go(sender, reference is not None)
        return wall, before.elapsed_time(after) / 1e3

    def stage_order(
        self,
        forward: Forward,
        local: list[int],
        remote: list[int],
        last: bool,
        reference: OneCopy | None = None,
    ) -> tuple[float, float]:
        """The stage actor's order now (cluster/stage_actor.py): queue `forward`, `send` on a
        side stream behind it (`behind_current_stream`), wait for the forward with
        `out.cpu()`, then (last stage) the sampled token, and poll back to back to Success;
        with `reference`, that copy goes on the side stream in the place of `send`. Returns
        the GPU's seconds from the forward's end to the copy's end (events on the two
        streams: the transfer from the moment its KV exists), and the host's seconds from
        the wait's return to Success."""
        sender, token = self.prepare(remote, last)
        forward.queue(local)
        ready = torch.cuda.Event(enable_timing=True)
        landed = torch.cuda.Event(enable_timing=True)
        ready.record()
        with behind_current_stream(torch.device("cuda")):
            if reference is None:
                sender.send(local)
            else:
                reference()
            landed.record()
        forward.sync()
        waited = time.perf_counter()
        if reference is None:
            if token is not None:
                sender.send_first_token(token)
            _wait(sender, busy=True)
        else:
            while not landed.query():
                pass
        done = time.perf_counter() - waited
        landed.synchronize()
        self._let_go(sender, reference is not None)
        return ready.elapsed_time(landed) / 1e3, done

    def check(self, local: list[int], remote: list[int]) -> bool:
        return torch.equal(self.peer.checksums(remote), page_checksums(self.cache.layers, local))


class Forward:
    """A stand-in for the last prefill stage's forward, queued on the current stream.

    Host-bound (`LightForward`): per layer one 2048^2 bf16 matmul (~30 us) and a rewrite of the
    request's K/V pages; its ~56 launches take about as long on the host as the GPU takes to
    run them, so little GPU work is left queued when `send` is called (the engine's short
    prefills are host-bound too). Model-sized (`ModelForward`): per layer the MLP matmuls of
    Qwen2-1.5B (hidden 1536, intermediate 8960) over the request's tokens, then the K/V rewrite:
    GPU-bound, milliseconds of GPU work still queued when `send` is called. The K/V pages are
    multiplied by one, so their bytes stay what the checksums expect.
    """

    def __init__(self, cache: PagedKVCache) -> None:
        self.layers = cache.layers

    def layer(self) -> None:
        raise NotImplementedError

    def queue(self, pages: list[int]) -> None:
        first, last = pages[0], pages[-1] + 1  # the bench's local pages are one run
        for layer in self.layers:
            self.layer()
            layer[:, first:last].mul_(1)

    def sync(self) -> None:
        """Wait for the forward the way a stage does before `send`: `out.cpu()`."""
        self.output().cpu()

    def output(self) -> torch.Tensor:
        raise NotImplementedError

    def gpu_ms(self, pages: list[int], reps: int = 10) -> float:
        """The forward's own GPU time (median ms, GPU busy before it: launches hidden)."""
        return 1e3 * statistics.median(_gpu_time(lambda: self.queue(pages), reps, busy=True))


class LightForward(Forward):
    def __init__(self, cache: PagedKVCache, size: int = 2048) -> None:
        super().__init__(cache)
        self.a = torch.randn(size, size, dtype=torch.bfloat16, device="cuda")
        self.b = torch.randn(size, size, dtype=torch.bfloat16, device="cuda")
        self.c = torch.empty_like(self.a)

    def layer(self) -> None:
        torch.mm(self.a, self.b, out=self.c)

    def output(self) -> torch.Tensor:
        return self.c[-1]


class ModelForward(Forward):
    HIDDEN, INTERMEDIATE = 1536, 8960

    def __init__(self, cache: PagedKVCache, tokens: int) -> None:
        super().__init__(cache)
        h, i = self.HIDDEN, self.INTERMEDIATE
        self.x = torch.randn(tokens, h, dtype=torch.bfloat16, device="cuda") * 0.01
        self.up = torch.randn(h, 2 * i, dtype=torch.bfloat16, device="cuda") * 0.01
        self.down = torch.randn(i, h, dtype=torch.bfloat16, device="cuda") * 0.01
        self.mid = torch.empty(tokens, 2 * i, dtype=torch.bfloat16, device="cuda")
        self.out = torch.empty_like(self.x)

    def layer(self) -> None:
        torch.mm(self.x, self.up, out=self.mid)  # gate and up
        torch.mm(self.mid[:, : self.INTERMEDIATE], self.down, out=self.out)

    def output(self) -> torch.Tensor:
        return self.out  # a middle stage's hidden states, handed to Ray on the CPU


class Timed:
    """Wraps a callable attribute of one object (or module) and keeps the seconds of each call
    (bench-only probe); `restore` puts the original back."""

    def __init__(self, owner: object, name: str) -> None:
        self._owner, self._name = owner, name
        self._had = name in getattr(owner, "__dict__", {})
        self._fn = getattr(owner, name)
        self.seconds: list[float] = []
        setattr(owner, name, self)

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self._fn(*args, **kwargs)
        finally:
            self.seconds.append(time.perf_counter() - start)

    def restore(self) -> None:
        if self._had:
            setattr(self._owner, self._name, self._fn)
        else:
            delattr(self._owner, self._name)


class TimedMethod:
    """Wraps a method of a class (every instance) and keeps the seconds of each call."""

    def __init__(self, cls: type, name: str) -> None:
        self._cls, self._name = cls, name
        fn = self._fn = cls.__dict__[name]
        self.seconds: list[float] = []
        seconds = self.seconds

        def timed(obj, *args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(obj, *args, **kwargs)
            finally:
                seconds.append(time.perf_counter() - start)

        setattr(cls, name, timed)

    def restore(self) -> None:
        setattr(self._cls, self._name, self._fn)


def _gpu_time(fn, reps: int, busy: bool = False) -> list[float]:
    """GPU seconds between events around `fn`'s work. `busy`: the GPU is kept busy while the
    host launches, so only the work itself counts (else an idle GPU waits for the launch)."""
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if busy:
            torch.cuda._sleep(1_000_000)  # ~0.5 ms, longer than any launch
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


def device_copies(
    cache: PagedKVCache, local: list[int], remote: list[int], reps: int
) -> dict[str, float]:
    """Median seconds, in this process: one contiguous copy of as many bytes (GPU time); the
    fast path's page copy of the request's runs (GPU time, and host time launch to done); the
    general path's segment copy (host time, launch to done)."""
    scratch = PagedKVCache(SHAPE.spec(), 0, SHAPE.num_layers, device="cuda")
    page = SHAPE.layout().page_nbytes
    segments = kv_segments(
        cache.regions(),
        {r.layer: LayerAddress.from_region(r) for r in scratch.regions()},
        local,
        remote,
        page,
    )
    as_array = partial(np.asarray, dtype=np.int64)
    copies = Copies(as_array(segments.srcs), as_array(segments.dsts), as_array(segments.lengths))
    backend, device = CudaIpc(), torch.device("cuda", 0)
    backend.warm_up(device)

    def starts(c: PagedKVCache) -> np.ndarray:  # a route's rows: layer 0 K, V, layer 1 K, ...
        return np.array([r.base_address + k * r.kv_stride for r in c.regions() for k in (0, 1)])

    route = PageRoute(starts(cache), starts(scratch), page // 8, SHAPE.num_pages, SHAPE.num_pages)
    route.table = backend.prepare_route(route, device)
    runs = plan_runs(route, local, np.array(remote, np.int64))
    assert runs is not None
    src_one = torch.empty(segments.nbytes, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst_one = torch.empty_like(src_one)

    def segments_copy() -> float:
        start = time.perf_counter()
        backend.wait(backend.launch(copies, None, device, peer=False))
        return time.perf_counter() - start

    def pages_copy() -> float:
        start = time.perf_counter()
        backend.wait(backend.launch_pages(route, runs, device))
        return time.perf_counter() - start

    for _ in range(3):
        dst_one.copy_(src_one)
        segments_copy()
        pages_copy()
    torch.cuda.synchronize()
    one = statistics.median(_gpu_time(lambda: dst_one.copy_(src_one), reps))
    one_busy = statistics.median(_gpu_time(lambda: dst_one.copy_(src_one), reps, busy=True))
    pages_gpu = statistics.median(
        _gpu_time(lambda: backend.launch_pages(route, runs, device), reps, busy=True)
    )
    pages_host = statistics.median(pages_copy() for _ in range(reps))
    kernel = statistics.median(segments_copy() for _ in range(reps))
    ok = all(
        torch.equal(d[:, r], s[:, lp])
        for s, d in zip(cache.layers, scratch.layers, strict=True)
        for lp, r in ((local[0], remote[0]), (local[-1], remote[-1]))
    )
    if not ok:
        raise RuntimeError("the page copy moved the wrong bytes")
    return {
        "one_copy": one,  # as measured before (GPU idle until the launch lands)
        "one_copy_busy": one_busy,  # the copy alone
        "pages_kernel_gpu": pages_gpu,
        "pages_kernel_host": pages_host,
        "segments_kernel": kernel,
    }


def host_memory_ipc() -> dict[str, str]:
    """Can the first-token slot (host memory) go by CUDA IPC? Try exporting host memory."""
    import ctypes

    rt = CudaIpc().runtime
    out = {}
    pinned = torch.empty(4096, dtype=torch.uint8, pin_memory=True)  # cudaHostAlloc
    plain = np.zeros(8192, np.uint8)
    base = (plain.ctypes.data + 4095) & ~4095
    lib = rt._rt
    lib.cudaHostRegister.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint)
    lib.cudaHostUnregister.argtypes = (ctypes.c_void_p,)
    lib.cudaHostGetDevicePointer.argtypes = (
        ctypes.POINTER(ctypes.c_void_p),
        ctypes.c_void_p,
        ctypes.c_uint,
    )
    rc = lib.cudaHostRegister(base, 4096, 1 | 2)  # portable | mapped
    out["cudaHostRegister"] = f"rc={rc}"
    dev = ctypes.c_void_p()
    rc = lib.cudaHostGetDevicePointer(ctypes.byref(dev), base, 0)
    out["cudaHostGetDevicePointer"] = f"rc={rc}"
    for name, ptr in (
        ("cudaHostAlloc'd (torch pinned)", pinned.data_ptr()),
        ("cudaHostRegister'd", base),
        ("its device pointer", dev.value or 0),
    ):
        try:
            rt.get_mem_handle(ptr)
            out[name] = "exported"
        except RuntimeError as exc:
            out[name] = str(exc)
    lib.cudaHostUnregister(base)
    lib.cudaGetLastError()
    print("host memory by CUDA IPC:", out, file=sys.stderr, flush=True)
    return out


def call_probes(fast: Prefill) -> dict[str, Timed | TimedMethod]:
    """Timers on the fast path's steps in `send` (bench-only; `restore_probes` removes them)."""
    path = fast.endpoint.cuda_ipc
    assert path is not None
    return {
        "plan": TimedMethod(CudaIpcMover, "plan_pages"),
        "launch": Timed(path, "launch"),
        "launch_pages": Timed(path.backend, "launch_pages"),
        "record": Timed(fast.endpoint, "write_async"),
    }


def phase_probes(fast: Prefill) -> dict[str, Timed | TimedMethod]:
    """Timers on each call `launch_pages` makes (after the route and the staging exist): where
    its time goes in the sender's flow and in a loop of launches alone. Only the calls this
    code has: the current code's, or the previous code's (`.before/`)."""
    path = fast.endpoint.cuda_ipc
    assert path is not None and isinstance(path.backend, CudaIpc)
    backend = path.backend
    (mapping,) = path._mappings.values()
    (on_device,) = [r.table for r in mapping.routes.values() if r is not None]
    staging = backend._staging_for(torch.device("cuda", 0))
    runtime = backend.runtime
    candidates: list[tuple[str, object, str]] = [
        ("current_raw_stream", ipc_backend, "_current_raw_stream"),  # now
        ("take", staging, "take"),
        ("graph_launch", runtime, "graph_launch"),
        ("event_record", runtime, "event_record"),
        ("current_stream", torch.cuda, "current_stream"),  # before
        ("memcpy_async", runtime, "memcpy_async"),
        ("replay", getattr(on_device, "graph", None), "replay"),
    ]
    probes: dict[str, Timed | TimedMethod] = {
        name: Timed(owner, attr)
        for name, owner, attr in candidates
        if owner is not None and hasattr(owner, attr)
    }
    if not hasattr(on_device, "graphs"):  # before: torch events per request
        probes["record_event"] = TimedMethod(torch.cuda.Stream, "record_event")
    return probes


def restore_probes(probes: dict[str, Timed | TimedMethod]) -> None:
    for probe in probes.values():
        probe.restore()


def phase_medians(probes: dict, prefix: str) -> dict[str, float]:
    """Median ms of each probe since the last call (then cleared); probes not called: none."""
    out = {
        f"{prefix}{k}_ms": 1e3 * statistics.median(p.seconds)
        for k, p in probes.items()
        if p.seconds
    }
    for probe in probes.values():
        probe.seconds.clear()
    return out


def profile_launch(fast: Prefill) -> dict:
    """The fast path's plan + launch + wait for 2k tokens in this thread alone, without the
    sender, the record or polling (no probes), then the same with a timer on each call
    (`hot_*`); cProfile's top entries go to the log (where time goes)."""
    n = 2048 // SHAPE.page_size
    info = fast.peer.receive("profile", 0, list(range(OFFSET, OFFSET + n)))
    mover = fast.endpoint.mover_for(info, fast.cache.regions())
    assert isinstance(mover, CudaIpcMover) and mover.route is not None, mover.why
    local = list(range(n))

    def once() -> tuple[float, float, float]:
        t0 = time.perf_counter()
        runs = mover.plan_pages(local)
        t1 = time.perf_counter()
        copy = mover.launch(runs)
        t2 = time.perf_counter()
        assert copy is not None
        while not copy.landed():
            pass
        copy.release()
        return t1 - t0, t2 - t1, time.perf_counter() - t2

    for _ in range(5):
        once()
    times = [once() for _ in range(50)]
    phases = phase_probes(fast)
    for _ in range(50):
        once()
    hot = phase_medians(phases, "hot_")
    restore_probes(phases)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(50):
        once()
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(20)
    print(out.getvalue(), file=sys.stderr, flush=True)
    fast.peer.settle("profile", False, "profile only")
    med = [1e3 * statistics.median(t[k] for t in times) for k in range(3)]
    nbytes = 2 * SHAPE.num_layers * n * SHAPE.layout().page_nbytes
    return {
        "case": "2k, plan + launch + wait alone",
        "MiB": nbytes / 2**20,
        "segments": 2 * SHAPE.num_layers,
        "plan_ms": med[0],
        "launch_ms": med[1],
        "wait_ms": med[2],
        "fast_kv_only_write_ms": sum(med),
        "fast_kv_only_GB_s": nbytes / (sum(med) / 1e3) / 1e9,
        **hot,
    }


def scattered_pages(n: int, run: int, seed: int = 0) -> list[int]:
    """`n` decode pages in runs of `run`, the runs in shuffled order (a busy allocator)."""
    starts = list(range(OFFSET, OFFSET + n, run))
    random.Random(seed).shuffle(starts)
    return [s + k for s in starts for k in range(run)]


def case_pages(tokens: int, run: int | None) -> tuple[list[int], list[int], int]:
    """A case's prefill pages, its decode pages (contiguous from OFFSET, or shuffled runs of
    `run`) and the bytes it moves over all layers."""
    n = tokens // SHAPE.page_size
    remote = list(range(OFFSET, OFFSET + n)) if run is None else scattered_pages(n, run)
    return list(range(n)), remote, 2 * SHAPE.num_layers * n * SHAPE.layout().page_nbytes


def fast_series(
    fast: Prefill, local: list[int], remote: list[int], reps: int, last: bool, spin_s: float = 0.0
) -> tuple[float, float]:
    """Median send->Success and in-send seconds of `reps` fast-path requests."""
    walls, sends = [], []
    for _ in range(reps):
        sender, wall, in_send = fast.transfer(local, remote, last=last, spin_s=spin_s)
        assert sender.stats.mover == "cuda_ipc", sender.mover
        walls.append(wall)
        sends.append(in_send)
    return statistics.median(walls), statistics.median(sends)


def forward_series(
    fast: Prefill, forward: Forward, local: list[int], remote: list[int], reps: int, last: bool
) -> dict[str, float]:
    """Forward only and forward + send alternating (the order flips each rep), then in separate
    runs the forward's completion to Success and the GPU's view: median seconds of each."""
    alone, with_send = [], []
    for rep in range(reps):
        for send in (False, True) if rep % 2 else (True, False):
            wall = fast.behind_forward(forward, local, remote, last, send)
            (with_send if send else alone).append(wall)
    direct = [fast.gpu_behind_forward(forward, local, remote, last) for _ in range(reps)]
    return {
        "forward": statistics.median(alone),
        "forward_send": statistics.median(with_send),
        "done_to_success": statistics.median(d for d, _ in direct),
        "gpu_added": statistics.median(g for _, g in direct),
    }


class OneCopy:
    """One `copy_` of `nbytes` contiguous bytes between two buffers of its own (the reference)."""

    def __init__(self, nbytes: int) -> None:
        self.src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_(0, 255)
        self.dst = torch.empty_like(self.src)

    def __call__(self) -> None:
        self.dst.copy_(self.src)


CASES = [
    ("2k tokens", 2048, None),
    ("16k tokens", 16384, None),
    ("2k tokens, runs of 4 pages", 2048, 4),
]


def side_by_side(
    measure: Callable[..., tuple[float, float]], reference: OneCopy, reps: int
) -> dict[str, list[tuple[float, float]]]:
    """`measure(last, reference)` for a `copy_` in the place of `send`, KV only and the last
    stage, interleaved rep by rep so that the three see the same machine."""
    out: dict[str, list[tuple[float, float]]] = {"copy": [], "KV only": [], "last stage": []}
    for _ in range(reps):
        out["copy"].append(measure(False, reference))
        out["KV only"].append(measure(False))
        out["last stage"].append(measure(True))
    return out


def _headline_row(
    case: str, flow: str, kind: str, round_: int, write: float, one: float, in_flow: float
) -> dict:
    return {
        "case": case,
        "flow": flow,
        "kind": kind,
        "round": round_,
        "write_ms": 1e3 * write,
        "send_ms": float("nan"),
        "copy_one_ms": 1e3 * one,
        "vs_copy": one / write,
        "copy_in_flow_ms": 1e3 * in_flow,
        "vs_copy_in_flow": in_flow / write,
    }


def headline(reps: int, rounds: int) -> None:
    """Only the headline column, in three flows per case: the write against one `copy_` of as
    many bytes timed alone on the GPU in the same process (`vs_copy`), in `rounds` series of
    `reps` (a median each). Short, so that several processes of two versions of the code can
    alternate on one machine: the spread between processes is larger than within one.

    - `stage order`, the target's flow: the order the stage actor uses
      (`Prefill.stage_order`): a model-sized forward queued, `send` on a side stream behind it,
      then `out.cpu()`. `write_ms` is the GPU's time from the forward's end to the copy's end,
      `copy_in_flow_ms` the same for a `copy_` in the place of `send`, `after_wait_ms` the
      host's time from `out.cpu()`'s return to Success.
    - `GPU idle`: send->Success, `send` straight from the bootstrap's sleep on the pipe to the
      decode process; `copy_in_flow_ms` is one `copy_` launched there and polled to its end
      (`Prefill.copy_in_flow`): what any launch from that state costs.
    - `after sync`: the stage's old order (`Prefill.after_sync`): the forward waited for with
      `out.cpu()`, then `send`; its `copy_in_flow_ms` is a `copy_` launched there.
    """
    torch.cuda.set_device(0)
    peer = DecodePeer(SHAPE, device="cuda", timeout_s=120)
    fast = Prefill(peer, TransportConfig(hostname="127.0.0.1"), "fast")
    rows, checks = [], {}
    try:
        for name, tokens, run in CASES:
            local, remote, nbytes = case_pages(tokens, run)
            peer.reset()
            fast.transfer(local, remote, last=True)  # maps the peer, builds the route
            checks[name] = fast.check(local, remote)
            reference = OneCopy(nbytes)
            one = statistics.median(_gpu_time(reference, reps))
            model = ModelForward(fast.cache, tokens)
            for round_ in range(rounds):
                in_flow = statistics.median(
                    fast.copy_in_flow(reference, remote) for _ in range(reps)
                )
                for last, kind in ((False, "KV only"), (True, "last stage")):
                    write, in_send = fast_series(fast, local, remote, reps, last)
                    rows.append(_headline_row(name, "GPU idle", kind, round_, write, one, in_flow))
                    rows[-1]["send_ms"] = 1e3 * in_send
                    print(rows[-1], file=sys.stderr, flush=True)
                # The stage's old order, then its new one: each flow's three kinds interleaved
                # rep by rep (side by side), a `copy_` in the place of `send` among them.
                synced = side_by_side(
                    partial(fast.after_sync, model, local, remote), reference, reps
                )
                copy_wall = statistics.median(w for w, _ in synced["copy"])
                copy_gpu = statistics.median(g for _, g in synced["copy"])  # that state's copy
                for kind in ("KV only", "last stage"):
                    write = statistics.median(w for w, _ in synced[kind])
                    rows.append(
                        _headline_row(name, "after sync", kind, round_, write, copy_gpu, copy_wall)
                    )
                    rows[-1]["write_gpu_ms"] = 1e3 * statistics.median(g for _, g in synced[kind])
                    rows[-1]["copy_one_idle_ms"] = 1e3 * one
                    print(rows[-1], file=sys.stderr, flush=True)
                ordered = side_by_side(
                    partial(fast.stage_order, model, local, remote), reference, reps
                )
                copy_gpu = statistics.median(g for g, _ in ordered["copy"])
                for kind in ("KV only", "last stage"):
                    write = statistics.median(g for g, _ in ordered[kind])
                    rows.append(
                        _headline_row(name, "stage order", kind, round_, write, one, copy_gpu)
                    )
                    rows[-1]["after_wait_ms"] = 1e3 * statistics.median(h for _, h in ordered[kind])
                    print(rows[-1], file=sys.stderr, flush=True)
            checks[f"{name}: after sync"] = fast.check(local, remote)
            del model
            torch.cuda.empty_cache()
        backend = fast.endpoint.cuda_ipc.backend if fast.endpoint.cuda_ipc else None
        columns = [
            "case",
            "flow",
            "kind",
            "round",
            "write_ms",
            "send_ms",
            "copy_one_ms",
            "vs_copy",
            "copy_in_flow_ms",
            "vs_copy_in_flow",
            "write_gpu_ms",
            "copy_one_idle_ms",
            "after_wait_ms",
        ]
        write_report(
            "kv_transfer_headline",
            rows,
            columns,
            {
                "reps": reps,
                "checksums_equal": checks,
                "graphs_in_use": bool(getattr(backend, "graphs_in_use", False)),
            },
        )
        if not all(checks.values()):
            sys.exit("KV arrived corrupted")
    finally:
        fast.close()
        peer.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=30, help="fast path and copy repetitions")
    parser.add_argument("--mooncake-reps", type=int, default=4)
    parser.add_argument("--forward-reps", type=int, default=40, help="behind-a-forward pairs")
    parser.add_argument(
        "--headline",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="only send->Success with the GPU idle, ROUNDS series per case (kv_transfer_headline)",
    )
    args = parser.parse_args()
    if args.headline:
        headline(args.reps, args.headline)
        return
    torch.cuda.set_device(0)
    peer = DecodePeer(SHAPE, device="cuda", timeout_s=120)
    fast = Prefill(peer, TransportConfig(hostname="127.0.0.1"), "fast")
    slow = Prefill(peer, TransportConfig(hostname="127.0.0.1", cuda_ipc=False), "tcp")
    light = LightForward(fast.cache)
    rows, checks = [], {}
    path = fast.endpoint.cuda_ipc
    assert path is not None
    try:
        for name, tokens, run in CASES:
            local, remote, nbytes = case_pages(tokens, run)
            row: dict = {"case": name, "MiB": nbytes / 2**20}

            peer.reset()
            sender, first_wall, _ = fast.transfer(local, remote, last=True)
            row["first_transfer_ms"] = 1e3 * first_wall  # includes opening the mappings
            row["mover"] = sender.stats.mover
            row["segments"] = sender.stats.segments
            checks[f"{name}: fast path"] = fast.check(local, remote)

            # send->Success with the GPU idle at `send`, no probes.
            for last, key in ((True, "fast"), (False, "fast_kv_only")):
                write, in_send = fast_series(fast, local, remote, args.reps, last)
                row[f"{key}_write_ms"] = 1e3 * write
                row[f"{key}_send_ms"] = 1e3 * in_send
                row[f"{key}_GB_s"] = nbytes / write / 1e9
            row["wait_ms"] = row["fast_kv_only_write_ms"] - row["fast_kv_only_send_ms"]

            # Behind a forward: what the transfer adds to the stage's own work, after a
            # model-sized (GPU-bound) forward and after a light (host-bound) one.
            model = ModelForward(fast.cache, tokens)
            for forward, prefix in ((model, ""), (light, "hostbound_")):
                row[f"{prefix}forward_gpu_ms"] = forward.gpu_ms(local)
                for last, key in ((True, "added"), (False, "added_kv_only")):
                    times = forward_series(fast, forward, local, remote, args.forward_reps, last)
                    added = times["forward_send"] - times["forward"]
                    key = prefix + key
                    row[f"{key}_ms"] = 1e3 * added
                    row[f"{key}_GB_s"] = nbytes / added / 1e9 if added > 0 else float("inf")
                    row[f"{key}_gpu_ms"] = 1e3 * times["gpu_added"]
                    done = times["done_to_success"]
                    row[f"{key}_done_to_success_ms"] = 1e3 * done
                    row[f"{key}_done_to_success_GB_s"] = nbytes / done / 1e9
                    if last:
                        row[f"{prefix}forward_ms"] = 1e3 * times["forward"]
                        row[f"{prefix}forward_send_ms"] = 1e3 * times["forward_send"]
            # The stage actor's order: sends on a side stream before the wait (the headline).
            ordered = side_by_side(
                partial(fast.stage_order, model, local, remote), OneCopy(nbytes), args.reps
            )
            for kind, key in (("KV only", "stage_order"), ("last stage", "stage_order_last")):
                landed = statistics.median(g for g, _ in ordered[kind])
                row[f"{key}_ms"] = 1e3 * landed
                row[f"{key}_GB_s"] = nbytes / landed / 1e9
                row[f"{key}_after_wait_ms"] = 1e3 * statistics.median(h for _, h in ordered[kind])
            row["stage_order_copy_ms"] = 1e3 * statistics.median(g for g, _ in ordered["copy"])
            del model, ordered
            checks[f"{name}: fast path behind a forward"] = fast.check(local, remote)

            # Where `send`'s time goes: KV-only runs with timers on each step and call.
            probes = call_probes(fast)
            phases = phase_probes(fast)
            fast_series(fast, local, remote, args.reps, last=True)
            row["record_ms"] = 1e3 * statistics.median(probes["record"].seconds)
            for probe in (*probes.values(), *phases.values()):
                probe.seconds.clear()
            probed, _ = fast_series(fast, local, remote, args.reps, last=False)
            row["probed_kv_only_write_ms"] = 1e3 * probed
            for key in ("plan", "launch", "launch_pages"):
                row[f"{key}_ms"] = 1e3 * statistics.median(probes[key].seconds)
            row.update(phase_medians(phases, "cold_"))
            restore_probes(phases)
            restore_probes(probes)

            # The same KV-only writes from a thread that was busy (not asleep) before `send`.
            write, in_send = fast_series(fast, local, remote, args.reps, False, spin_s=1e-3)
            row["busy_kv_only_write_ms"] = 1e3 * write
            row["busy_kv_only_send_ms"] = 1e3 * in_send
            row["busy_kv_only_GB_s"] = nbytes / write / 1e9

            peer.reset()
            sender, _, _ = slow.transfer(local, remote, last=True)
            checks[f"{name}: mooncake"] = slow.check(local, remote)
            writes = []
            for _ in range(args.mooncake_reps):
                sender, _, _ = slow.transfer(local, remote, last=True)
                assert sender.stats.mover == "mooncake"
                writes.append(sender.stats.seconds)
            row["mooncake_write_ms"] = 1e3 * statistics.median(writes)
            row["mooncake_GB_s"] = nbytes / statistics.median(writes) / 1e9

            copies = device_copies(fast.cache, local, remote, args.reps)
            torch.cuda.empty_cache()
            row["copy_one_GB_s"] = nbytes / copies["one_copy"] / 1e9
            row["copy_one_ms"] = 1e3 * copies["one_copy"]
            row["copy_one_alone_ms"] = 1e3 * copies["one_copy_busy"]
            row["pages_kernel_gpu_ms"] = 1e3 * copies["pages_kernel_gpu"]
            row["pages_kernel_GB_s"] = nbytes / copies["pages_kernel_gpu"] / 1e9
            row["pages_launch_to_done_GB_s"] = nbytes / copies["pages_kernel_host"] / 1e9
            row["copy_segments_GB_s"] = nbytes / copies["segments_kernel"] / 1e9
            for key in (
                "fast",
                "fast_kv_only",
                "busy_kv_only",
                "stage_order",
                "added",
                "added_kv_only",
                "hostbound_added",
                "hostbound_added_kv_only",
                "added_done_to_success",
                "added_kv_only_done_to_success",
                "hostbound_added_done_to_success",
                "hostbound_added_kv_only_done_to_success",
            ):
                row[f"{key}_vs_copy"] = row[f"{key}_GB_s"] / row["copy_one_GB_s"]
            row["fast_vs_mooncake"] = row["fast_GB_s"] / row["mooncake_GB_s"]
            row["target_vs_copy"] = 0.5
            rows.append(row)
            print(row, file=sys.stderr, flush=True)
        rows.append(profile_launch(fast))
        host_ipc = host_memory_ipc()
        columns = [
            "case",
            "MiB",
            "segments",
            "fast_GB_s",
            "fast_kv_only_GB_s",
            "added_GB_s",
            "added_kv_only_GB_s",
            "mooncake_GB_s",
            "copy_one_GB_s",
            "pages_kernel_GB_s",
            "fast_vs_copy",
            "fast_kv_only_vs_copy",
            "added_vs_copy",
            "added_kv_only_vs_copy",
            "hostbound_added_vs_copy",
            "hostbound_added_kv_only_vs_copy",
            "busy_kv_only_vs_copy",
            "stage_order_vs_copy",
            "stage_order_ms",
            "stage_order_copy_ms",
            "stage_order_after_wait_ms",
            "stage_order_last_after_wait_ms",
            "target_vs_copy",
            "fast_write_ms",
            "fast_send_ms",
            "fast_kv_only_write_ms",
            "fast_kv_only_send_ms",
            "added_done_to_success_vs_copy",
            "added_kv_only_done_to_success_vs_copy",
            "added_ms",
            "added_kv_only_ms",
            "added_done_to_success_ms",
            "added_kv_only_done_to_success_ms",
            "added_gpu_ms",
            "added_kv_only_gpu_ms",
            "forward_ms",
            "forward_gpu_ms",
            "hostbound_added_ms",
            "hostbound_added_kv_only_ms",
            "hostbound_added_done_to_success_ms",
            "hostbound_added_kv_only_done_to_success_ms",
            "hostbound_added_gpu_ms",
            "hostbound_added_kv_only_gpu_ms",
            "hostbound_forward_ms",
            "hostbound_forward_gpu_ms",
            "plan_ms",
            "launch_ms",
            "launch_pages_ms",
            "probed_kv_only_write_ms",
            "busy_kv_only_write_ms",
            "busy_kv_only_send_ms",
            "record_ms",
            "wait_ms",
            "copy_one_ms",
            "copy_one_alone_ms",
            "pages_kernel_gpu_ms",
            "first_transfer_ms",
        ]
        backend = path.backend
        write_report(
            "kv_transfer_gpu",
            rows,
            columns,
            {
                "shape": SHAPE.__dict__,
                "checksums_equal": checks,
                "reps": args.reps,
                "forward_reps": args.forward_reps,
                "host_memory_by_cuda_ipc": host_ipc,
                "graphs_in_use": isinstance(backend, CudaIpc) and backend.graphs_in_use,
                "graphs_record_events": bool(getattr(backend, "graphs_record_events", False)),
            },
        )
        print(
            "checksums equal:",
            checks,
            "graphs in use:",
            backend.graphs_in_use,
            "graphs record events:",
            getattr(backend, "graphs_record_events", None),
        )
        if not all(checks.values()):
            sys.exit("KV arrived corrupted")
    finally:
        fast.close()
        slow.close()
        peer.stop()


if __name__ == "__main__":
    main()
