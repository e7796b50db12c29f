"""What the KV transfer bench (kv_transfer_bench.py) measures beside the sender's flows: timers
on the fast path's calls (bench-only probes, installed and removed around the runs that report
them), its plan + launch + wait alone, the copies inside this process, and whether host memory
can be exported with CUDA IPC.

The probes attach only to calls the code has, so they also time another version of the code
(`.before/`, NOTES_transport.md) as long as it has the `transport.cuda_ipc` package layout.
"""

from __future__ import annotations

import cProfile
import ctypes
import io
import pstats
import statistics
import sys
import time
from functools import partial

import numpy as np
import torch

from benchmarks.gpu.kv_transfer_setup import OFFSET, SHAPE, PrefillSide, gpu_time
from engine.kv_cache import PagedKVCache
from transport.cuda_ipc import backend as ipc_backend
from transport.cuda_ipc.backend import CudaIpc
from transport.cuda_ipc.kernels import Copies
from transport.cuda_ipc.mover import CudaIpcMover
from transport.cuda_ipc.routes import PageRoute, plan_runs
from transport.receiver_info import LayerAddress
from transport.segments import kv_segments


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


def call_probes(fast: PrefillSide) -> dict[str, Timed | TimedMethod]:
    """Timers on the fast path's steps in `send` (bench-only; `restore_probes` removes them)."""
    path = fast.endpoint.cuda_ipc
    assert path is not None
    return {
        "plan": TimedMethod(CudaIpcMover, "plan_pages"),
        "launch": Timed(path, "launch"),
        "launch_pages": Timed(path.backend, "launch_pages"),
        "record": Timed(fast.endpoint, "write_async"),
    }


def phase_probes(fast: PrefillSide) -> dict[str, Timed | TimedMethod]:
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


def profile_launch(fast: PrefillSide) -> dict:
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
    one = statistics.median(gpu_time(lambda: dst_one.copy_(src_one), reps))
    one_busy = statistics.median(gpu_time(lambda: dst_one.copy_(src_one), reps, busy=True))
    pages_gpu = statistics.median(
        gpu_time(lambda: backend.launch_pages(route, runs, device), reps, busy=True)
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
