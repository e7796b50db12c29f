"""KV transfer throughput and latency: our `KVSender` against bare Mooncake and memcpy.

One large request (32 layers, 2048 tokens, 8 KV heads of 128, bfloat16: 256 MiB) and a batch
of small ones, written into a decode process over Mooncake tcp on loopback. The bare baseline
is one `batch_transfer_sync_write` of exactly the segments our sender builds, so the ratio is
what our state machine, validation and thread hop cost; memcpy of the same bytes inside one
process is the physical limit of this machine. Alternating rounds in one run, medians reported.
Target: ours >= 0.9x bare Mooncake.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import time

os.environ.setdefault("GLOG_minloglevel", "2")


from benchmarks.report import write_report
from engine.kv_cache import PagedKVCache
from tests.transport.peer import CacheShape, DecodePeer, PrefillStage
from transport import FirstToken, KVPoll, KVSender, TransportConfig
from transport.receiver_info import LayerAddress
from transport.segments import kv_segments

LARGE = CacheShape(
    num_layers=32, num_pages=136, page_size=16, num_kv_heads=8, head_dim=128, dtype="bfloat16"
)


def _wait(sender: KVSender) -> None:
    while (state := sender.poll()) not in (KVPoll.Success, KVPoll.Failed):
        time.sleep(0.0002)
    if state is KVPoll.Failed:
        raise RuntimeError(sender.failure_reason)


class Bench(PrefillStage):
    """A prefill stage holding every layer, sending to `decode` three ways."""

    def __init__(self, shape: CacheShape, decode: DecodePeer, config: TransportConfig) -> None:
        super().__init__(shape, config)
        self.decode = decode
        self.scratch = PagedKVCache(shape.spec(), 0, shape.num_layers)  # memcpy destination
        self._n = 0

    def ours(self, requests: list[tuple[list[int], list[int]]]) -> tuple[float, list[float]]:
        """Total seconds and per-request latency for all `requests` sent at once."""
        senders = []
        for local, remote in requests:
            self._n += 1
            senders.append((self.sender_to(self.decode, f"b{self._n}", self._n, remote), local))
        start = time.perf_counter()
        for s, local in senders:
            s.send(local, FirstToken(s.room, 1, 0.0, 1))
        latencies = []
        for s, _ in senders:
            _wait(s)
            latencies.append(time.perf_counter() - start)
        total = time.perf_counter() - start
        for s, _ in senders:
            self.decode.result(s.rid, 0, True)
        return total, latencies

    def bare(self, requests: list[tuple[list[int], list[int]]]) -> tuple[float, list[float]]:
        """The same segments with `batch_transfer_sync_write`, one call per request."""
        info = self.decode.receive("bare", 0, list(range(self.shape.num_pages)), 1)
        remote = {a.layer: a for a in info.layers}
        batches = [
            kv_segments(self.cache.regions(), remote, local, rem, self.shape.layout().page_nbytes)
            for local, rem in requests
        ]
        start = time.perf_counter()
        latencies = []
        for seg in batches:
            rc = self.endpoint.write(self.decode.session_id, seg.srcs, seg.dsts, seg.lengths)
            assert rc == 0, rc
            latencies.append(time.perf_counter() - start)
        total = time.perf_counter() - start
        self.decode.abort("bare")
        return total, latencies

    def memcpy(self, requests: list[tuple[list[int], list[int]]]) -> float:
        """memmove of exactly the segments a transfer writes, within this process."""
        remote = {r.layer: LayerAddress.from_region(r) for r in self.scratch.regions()}
        page = self.shape.layout().page_nbytes
        batches = [kv_segments(self.cache.regions(), remote, lo, re, page) for lo, re in requests]
        start = time.perf_counter()
        for seg in batches:
            for src, dst, n in zip(seg.srcs, seg.dsts, seg.lengths, strict=True):
                ctypes.memmove(dst, src, n)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--send-threads", type=int, default=TransportConfig().send_threads)
    args = parser.parse_args()
    decode = DecodePeer(LARGE)
    bench = Bench(LARGE, decode, TransportConfig(send_threads=args.send_threads))
    try:
        large = [(list(range(128)), list(range(4, 132)))]  # 2048 tokens
        # 32 small requests of 64 tokens (4 pages), scattered like a busy allocator's pages.
        small = [
            (list(range(4 * i, 4 * i + 4)), list(range(128 - 4 * i, 132 - 4 * i)))
            for i in range(32)
        ]
        page = LARGE.layout().page_nbytes
        rows = []
        for name, reqs in (("1 x 2048 tokens", large), ("32 x 64 tokens", small)):
            nbytes = sum(len(local) for local, _ in reqs) * page * 2 * LARGE.num_layers
            bench.ours(reqs), bench.bare(reqs)  # warm connections and caches
            ours, bare, mem, lat_ours, lat_bare = [], [], [], [], []
            for _ in range(args.rounds):
                t, lat = bench.ours(reqs)
                ours.append(t)
                lat_ours.extend(lat if len(reqs) == 1 else [])
                t, lat = bench.bare(reqs)
                bare.append(t)
                mem.append(bench.memcpy(reqs))
            if len(reqs) > 1:  # per-request latency: one request alone, many times
                for _ in range(args.rounds * 4):
                    lat_ours.append(bench.ours(reqs[:1])[0])
                    lat_bare.append(bench.bare(reqs[:1])[0])
            else:
                lat_bare = bare
            gbps = {
                k: nbytes / statistics.median(v) / 1e9
                for k, v in (("ours", ours), ("bare", bare), ("memcpy", mem))
            }
            rows.append(
                {
                    "case": name,
                    "MiB": nbytes / 2**20,
                    "ours_GB_s": gbps["ours"],
                    "bare_mooncake_GB_s": gbps["bare"],
                    "memcpy_GB_s": gbps["memcpy"],
                    "ours_vs_bare": gbps["ours"] / gbps["bare"],
                    "ours_vs_memcpy": gbps["ours"] / gbps["memcpy"],
                    "p50_latency_ms_ours": 1e3 * statistics.median(lat_ours),
                    "p50_latency_ms_bare": 1e3 * statistics.median(lat_bare),
                    "target": 0.9,
                }
            )
        write_report("transport", rows, list(rows[0]), {"shape": LARGE.__dict__})
    finally:
        bench.endpoint.close()
        decode.stop()


if __name__ == "__main__":
    main()
