"""One request's KV, GPU to GPU across two processes: CUDA IPC fast path vs Mooncake tcp vs copy.

Shape: a Qwen2-1.5B-like KV cache (28 layers, 2 KV heads of 128, bfloat16, 16-token pages: 8 KiB
per page of K or V, 28 KiB per token over all layers), requests of 2k and 16k tokens. The prefill
side is this process (one `KVSender` holding every layer, the project's real sender); the decode
side is a spawned process with its cache on the same GPU (tests/gpu/decode_peer.py, the real
`KVReceiver`). Timed:

- `fast path`: the sender with the CUDA IPC mover; `write` is the mover's time (copies queued,
  the first-token record written by Mooncake meanwhile, copies waited for), `send->Success` adds
  the pool hop and polling. Last stage (KV + first-token record) and a middle stage (KV only).
- `mooncake tcp`: the same sender with the fast path off (Mooncake tcp on loopback).
- `device copy`: in this process, one `copy_` of as many contiguous bytes (the ceiling), and
  the sender's exact segments through the fast path's own batched copy, launch to done (what
  the copy itself costs, without the sender, the other process or the first-token record).
- a breakdown of the fast path's write: planning (address translation), launching the copy,
  waiting for it (`plan_ms`, `launch_ms`, `wait_ms`, medians of the KV-only runs).

Target: fast path (write) >= 0.5x the one-copy bandwidth. Bandwidth counts bytes moved once
(a copy reads and writes each: 1.5 TB/s here is 3.0 TB/s read+write). Pages are checked by
checksum after the first transfer of each kind.
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
from functools import partial

os.environ.setdefault("GLOG_minloglevel", "2")

import numpy as np
import torch

from benchmarks.gpu.common import write_report
from engine.kv_cache import PagedKVCache
from tests.gpu.decode_peer import GpuDecodePeer, page_checksums
from tests.transport.peer import CacheShape
from transport import FirstToken, KVPoll, KVSender, TransferEndpoint, TransportConfig
from transport.cuda_ipc import Copies, CudaIpc
from transport.receiver_info import LayerAddress
from transport.segments import kv_segments

SHAPE = CacheShape(
    num_layers=28, num_pages=1024 + 64, page_size=16, num_kv_heads=2, head_dim=128, dtype="bfloat16"
)
OFFSET = 32  # decode pages start here: runs are contiguous on both sides, just not aligned


def _wait(sender: KVSender, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while (state := sender.poll()) not in (KVPoll.Success, KVPoll.Failed):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{sender.rid} stuck in {state.name}")
        time.sleep(20e-6)
    if state is KVPoll.Failed:
        raise RuntimeError(sender.failure_reason)


class Prefill:
    """This process's side: an endpoint and a GPU cache of random bytes."""

    def __init__(self, peer: GpuDecodePeer, config: TransportConfig, tag: str) -> None:
        self.peer = peer
        self.tag = tag
        self.endpoint = TransferEndpoint(config)
        self.cache = PagedKVCache(SHAPE.spec(), 0, SHAPE.num_layers, device="cuda")
        for layer in self.cache.layers:
            layer.normal_()
        self.endpoint.register_cache(self.cache)
        torch.cuda.synchronize()
        self._n = 0

    def transfer(self, local: list[int], remote: list[int], last: bool) -> tuple[KVSender, float]:
        """One request; returns the finished sender and its send->Success seconds."""
        self._n += 1
        rid = f"{self.tag}{self._n}"
        info = self.peer.receive(rid, self._n, remote)
        sender = KVSender(
            self.endpoint,
            rid=rid,
            room=self._n,
            regions=self.cache.regions(),
            layout=SHAPE.layout(),
            is_last_stage=last,
        )
        sender.set_receiver_info(info)
        if sender.poll() is not KVPoll.WaitingForInput:
            raise RuntimeError(sender.failure_reason)
        token = FirstToken(self._n, 1, 0.0, len(local) * SHAPE.page_size) if last else None
        start = time.perf_counter()
        sender.send(local, token)
        _wait(sender)
        wall = time.perf_counter() - start
        self.peer.result(rid, True)  # frees the receiver (a middle stage's lacks the record)
        return sender, wall

    def check(self, local: list[int], remote: list[int]) -> bool:
        return torch.equal(self.peer.checksums(remote), page_checksums(self.cache.layers, local))

    def close(self) -> None:
        self.endpoint.close()


class Timed:
    """Wraps a method of one object and keeps the seconds of each call (bench-only probe)."""

    def __init__(self, owner: object, name: str) -> None:
        self._fn = getattr(owner, name)
        self.seconds: list[float] = []
        setattr(owner, name, self)

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self._fn(*args, **kwargs)
        finally:
            self.seconds.append(time.perf_counter() - start)


def _gpu_time(fn, reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


def device_copies(
    cache: PagedKVCache, local: list[int], remote: list[int], reps: int
) -> dict[str, float]:
    """Median seconds, in this process, of one contiguous copy of as many bytes (GPU time), and
    of the sender's exact segments through the fast path's copy (host time: launch to done)."""
    scratch = PagedKVCache(SHAPE.spec(), 0, SHAPE.num_layers, device="cuda")
    segments = kv_segments(
        cache.regions(),
        {r.layer: LayerAddress.from_region(r) for r in scratch.regions()},
        local,
        remote,
        SHAPE.layout().page_nbytes,
    )
    as_array = partial(np.asarray, dtype=np.int64)
    copies = Copies(as_array(segments.srcs), as_array(segments.dsts), as_array(segments.lengths))
    backend, device = CudaIpc(), torch.device("cuda", 0)
    src_one = torch.empty(segments.nbytes, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst_one = torch.empty_like(src_one)

    def fast_copy() -> float:
        start = time.perf_counter()
        backend.wait(backend.launch(copies, None, device, peer=False))
        return time.perf_counter() - start

    for _ in range(3):
        dst_one.copy_(src_one)
        fast_copy()
    torch.cuda.synchronize()
    one = statistics.median(_gpu_time(lambda: dst_one.copy_(src_one), reps))
    kernel = statistics.median(fast_copy() for _ in range(reps))
    return {"one_copy": one, "segments_kernel": kernel}


def profile_launch(fast: Prefill, path) -> dict:
    """The fast path's plan + launch + wait for 2k tokens, in this thread alone (no pool hop,
    no polling thread), with cProfile's top entries in the log: where per-request time goes."""
    n = 2048 // SHAPE.page_size
    info = fast.peer.receive("profile", 0, list(range(OFFSET, OFFSET + n)))
    mapping, _ = path.select(info, [r.base_address for r in fast.cache.regions()])
    assert mapping is not None
    segments = kv_segments(
        fast.cache.regions(),
        {a.layer: a for a in info.layers},
        list(range(n)),
        list(info.page_indices),
        SHAPE.layout().page_nbytes,
    )
    device = torch.device("cuda", 0)

    def once() -> tuple[float, float, float]:
        t0 = time.perf_counter()
        copies, _ = path.plan(segments, mapping)
        t1 = time.perf_counter()
        done = path.backend.launch(copies, None, device, False)
        t2 = time.perf_counter()
        path.backend.wait(done)
        return t1 - t0, t2 - t1, time.perf_counter() - t2

    for _ in range(5):
        once()
    times = [once() for _ in range(50)]
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(50):
        once()
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(15)
    print(out.getvalue(), file=sys.stderr, flush=True)
    fast.peer.result("profile", False, "profile only")
    med = [1e3 * statistics.median(t[k] for t in times) for k in range(3)]
    nbytes = segments.nbytes
    return {
        "case": "2k, copy alone in one thread",
        "MiB": nbytes / 2**20,
        "segments": len(segments),
        "plan_ms": med[0],
        "launch_ms": med[1],
        "wait_ms": med[2],
        "fast_kv_only_GB_s": nbytes / (sum(med) / 1e3) / 1e9,
    }


def scattered_pages(n: int, run: int, seed: int = 0) -> list[int]:
    """`n` decode pages in runs of `run`, the runs in shuffled order (a busy allocator)."""
    starts = list(range(OFFSET, OFFSET + n, run))
    random.Random(seed).shuffle(starts)
    return [s + k for s in starts for k in range(run)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=30, help="fast path and copy repetitions")
    parser.add_argument("--mooncake-reps", type=int, default=4)
    args = parser.parse_args()
    torch.cuda.set_device(0)
    page = SHAPE.layout().page_nbytes
    cases = [
        ("2k tokens", 2048, None),
        ("16k tokens", 16384, None),
        ("2k tokens, runs of 4 pages", 2048, 4),
    ]
    peer = GpuDecodePeer(SHAPE)
    fast = Prefill(peer, TransportConfig(hostname="127.0.0.1"), "fast")
    slow = Prefill(peer, TransportConfig(hostname="127.0.0.1", cuda_ipc=False), "tcp")
    rows, checks = [], {}
    path = fast.endpoint.cuda_ipc
    assert path is not None
    probes = {
        "plan": Timed(path, "plan"),
        "launch": Timed(path.backend, "launch"),
        "wait": Timed(path.backend, "wait"),
    }
    try:
        for name, tokens, run in cases:
            n = tokens // SHAPE.page_size
            local = list(range(n))
            remote = list(range(OFFSET, OFFSET + n)) if run is None else scattered_pages(n, run)
            nbytes = 2 * SHAPE.num_layers * n * page
            row: dict = {"case": name, "MiB": nbytes / 2**20}

            peer.fill()
            sender, first_wall = fast.transfer(local, remote, last=True)
            row["first_transfer_ms"] = 1e3 * first_wall  # includes opening the mappings
            row["mover"] = sender.stats.mover
            row["segments"] = sender.stats.segments
            checks[f"{name}: fast path"] = fast.check(local, remote)
            for last, key in ((True, "fast"), (False, "fast_kv_only")):
                for probe in probes.values():
                    probe.seconds.clear()
                writes, walls = [], []
                for _ in range(args.reps):
                    sender, wall = fast.transfer(local, remote, last=last)
                    assert sender.stats.mover == "cuda_ipc", sender.mover
                    writes.append(sender.stats.seconds)
                    walls.append(wall)
                row[f"{key}_write_ms"] = 1e3 * statistics.median(writes)
                row[f"{key}_send_to_success_ms"] = 1e3 * statistics.median(walls)
                row[f"{key}_GB_s"] = nbytes / statistics.median(writes) / 1e9
            for phase, probe in probes.items():  # of the KV-only runs
                row[f"{phase}_ms"] = 1e3 * statistics.median(probe.seconds)

            peer.fill()
            sender, _ = slow.transfer(local, remote, last=True)
            checks[f"{name}: mooncake"] = slow.check(local, remote)
            writes = []
            for _ in range(args.mooncake_reps):
                sender, _ = slow.transfer(local, remote, last=True)
                assert sender.stats.mover == "mooncake"
                writes.append(sender.stats.seconds)
            row["mooncake_write_ms"] = 1e3 * statistics.median(writes)
            row["mooncake_GB_s"] = nbytes / statistics.median(writes) / 1e9

            copies = device_copies(fast.cache, local, remote, args.reps)
            torch.cuda.empty_cache()
            row["copy_one_GB_s"] = nbytes / copies["one_copy"] / 1e9
            row["copy_segments_GB_s"] = nbytes / copies["segments_kernel"] / 1e9
            row["fast_vs_copy"] = row["fast_GB_s"] / row["copy_one_GB_s"]
            row["fast_kv_only_vs_copy"] = row["fast_kv_only_GB_s"] / row["copy_one_GB_s"]
            row["fast_vs_mooncake"] = row["fast_GB_s"] / row["mooncake_GB_s"]
            row["target_vs_copy"] = 0.5
            rows.append(row)
            print(row, file=sys.stderr, flush=True)
        rows.append(profile_launch(fast, path))
        columns = [
            "case",
            "MiB",
            "segments",
            "fast_GB_s",
            "fast_kv_only_GB_s",
            "mooncake_GB_s",
            "copy_one_GB_s",
            "copy_segments_GB_s",
            "fast_vs_copy",
            "fast_kv_only_vs_copy",
            "target_vs_copy",
            "fast_write_ms",
            "fast_send_to_success_ms",
            "plan_ms",
            "launch_ms",
            "wait_ms",
            "first_transfer_ms",
        ]
        write_report(
            "kv_transfer_gpu",
            rows,
            columns,
            {"shape": SHAPE.__dict__, "checksums_equal": checks, "reps": args.reps},
        )
        print("checksums equal:", checks)
        if not all(checks.values()):
            sys.exit("KV arrived corrupted")
    finally:
        fast.close()
        slow.close()
        peer.stop()


if __name__ == "__main__":
    main()
