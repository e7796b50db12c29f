"""One request's KV from a prefill stage on GPU 0 into a decode cache on GPU 1: the CUDA IPC fast
path across GPUs (peer access) vs one `copy_` between the two GPUs vs Mooncake tcp (issue #25).

The set-up is kv_transfer_bench's: its KV shape (Qwen2-1.5B-like, 28 KiB per token), the
project's real `KVSender` in this process holding every layer on GPU 0, and the real
`KVReceiver` in a spawned decode process (tests/transport/peer.py), here with its cache on GPU 1
(`decode_peer(gpu=1)`). Across GPUs the fast path has no page route (its graph copies within one
GPU): the sender plans the request's segments and one `cudaMemcpyAsync` per run goes on the
transport's side stream from the transfer pool; the copy engines move the bytes over NVLink (or
PCIe, whatever `nvidia-smi topo -m` in the JSON says joins the two).

Per case (2k and 16k tokens, contiguous pages on both sides):
- `fast`: send->Success with the GPU idle (kv_transfer_bench's `GPU idle` flow), last stage
  (KV + first-token record), and KV only (`fast_kv_only`, a middle stage);
- `copy_peer`: one `copy_` of as many contiguous bytes from GPU 0 to GPU 1, its GPU time
  between events (the ceiling); `copy_in_flow_ms`: the same copy launched where `send` is, after
  the same bootstrap, and polled to its end (what any launch from there costs); `copy_local_ms`:
  a `copy_` within GPU 0, for scale (HBM against the link);
- `stage_order`: the stage actor's order (a model-sized forward queued, `send` on a side stream
  behind it, `out.cpu()`, then the token): host time from the wait's return to Success, beside
  a `copy_` to GPU 1 in the place of `send` (`stage_order_copy_ms`). kv_transfer_bench's GPU-time
  column for this flow needs the copy on the caller's stream, which the cross-GPU path is not;
- `mooncake`: the same sender with the fast path off (tcp on loopback).

Target: `vs_copy` = copy_peer_ms / fast_write_ms >= 0.5: the fast path moves a request's KV at
half the bandwidth of one bare copy between the two GPUs or better, host overhead included.
Pages are checked by checksum after every kind of transfer.

    python3 -m benchmarks.gpu.multi_gpu_fast_path             # 2 GPUs -> multi_gpu_fast_path.json
    python3 -m benchmarks.gpu.multi_gpu_fast_path --same-gpu  # the plumbing on one GPU
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from functools import partial
from typing import Any

os.environ.setdefault("GLOG_minloglevel", "2")

import torch

from benchmarks.gpu.kv_transfer_bench import Prefill, fast_series, side_by_side
from benchmarks.gpu.kv_transfer_setup import (
    CASES,
    SHAPE,
    ModelForward,
    OneCopy,
    case_pages,
    decode_peer,
    gpu_time,
)
from benchmarks.gpu.multi_gpu import (
    add_same_gpu_flag,
    logical_gpus,
    multicast_off,
    same_gpu_banner,
    topology,
)
from benchmarks.report import write_report
from transport import TransportConfig

FIGURE = "multi_gpu_fast_path"
DEFAULT_CASES = ("2k tokens", "16k tokens")
COLUMNS = [
    "case",
    "same_gpu",
    "path",
    "MiB",
    "fast_GB_s",
    "fast_kv_only_GB_s",
    "copy_peer_GB_s",
    "mooncake_GB_s",
    "vs_copy",
    "kv_only_vs_copy",
    "vs_copy_in_flow",
    "stage_order_vs_copy",
    "target_vs_copy",
    "fast_vs_mooncake",
    "fast_write_ms",
    "fast_send_ms",
    "fast_kv_only_write_ms",
    "copy_peer_ms",
    "copy_in_flow_ms",
    "copy_local_ms",
    "stage_order_ms",
    "stage_order_last_ms",
    "stage_order_copy_ms",
    "mooncake_write_ms",
    "first_transfer_ms",
    "segments",
]


def measure_case(
    fast: Prefill,
    slow: Prefill,
    case: tuple[str, int, int | None],
    decode_device: torch.device,
    args: argparse.Namespace,
    checks: dict[str, bool],
) -> dict[str, Any]:
    """Every figure of one case; `checks` gains a checksum comparison per kind of transfer."""
    name, tokens, run = case
    local, remote, nbytes = case_pages(tokens, run)
    row: dict[str, Any] = {"case": name, "same_gpu": args.same_gpu, "MiB": nbytes / 2**20}

    fast.peer.reset()
    sender, first_wall, _ = fast.transfer(local, remote, last=True)  # maps the peer
    mapping = getattr(sender.mover, "mapping", None)
    if sender.stats.mover != "cuda_ipc" or mapping is None:
        raise RuntimeError(
            f"the fast path did not serve {name}: {getattr(sender.mover, 'why', '')}"
        )
    row["first_transfer_ms"] = 1e3 * first_wall
    row["path"] = "graph, one GPU" if mapping.same_device else "memcpy per run, peer GPU"
    row["segments"] = sender.stats.segments
    checks[f"{name}: fast path"] = fast.check(local, remote)

    for last, key in ((True, "fast"), (False, "fast_kv_only")):
        write, in_send = fast_series(fast, local, remote, args.reps, last)
        row[f"{key}_write_ms"] = 1e3 * write
        row[f"{key}_send_ms"] = 1e3 * in_send
        row[f"{key}_GB_s"] = nbytes / write / 1e9

    peer_copy = OneCopy(nbytes, decode_device)
    row["copy_peer_ms"] = 1e3 * statistics.median(gpu_time(peer_copy, args.reps))
    row["copy_in_flow_ms"] = 1e3 * statistics.median(
        fast.copy_in_flow(peer_copy, remote) for _ in range(args.reps)
    )
    local_copy = OneCopy(nbytes)
    row["copy_local_ms"] = 1e3 * statistics.median(gpu_time(local_copy, args.reps))
    del local_copy

    model = ModelForward(fast.cache, tokens)
    ordered = side_by_side(partial(fast.stage_order, model, local, remote), peer_copy, args.reps)
    for kind, key in (("KV only", "stage_order"), ("last stage", "stage_order_last")):
        row[f"{key}_ms"] = 1e3 * statistics.median(host for _, host in ordered[kind])
    row["stage_order_copy_ms"] = 1e3 * statistics.median(host for _, host in ordered["copy"])
    del model, ordered, peer_copy
    torch.cuda.empty_cache()
    checks[f"{name}: fast path in the stage order"] = fast.check(local, remote)

    fast.peer.reset()
    slow.transfer(local, remote, last=True)
    checks[f"{name}: mooncake"] = slow.check(local, remote)
    writes = []
    for _ in range(args.mooncake_reps):
        sender, _, _ = slow.transfer(local, remote, last=True)
        assert sender.stats.mover == "mooncake", sender.stats.mover
        writes.append(sender.stats.seconds)
    row["mooncake_write_ms"] = 1e3 * statistics.median(writes)
    row["mooncake_GB_s"] = nbytes / statistics.median(writes) / 1e9

    row["copy_peer_GB_s"] = nbytes / row["copy_peer_ms"] * 1e3 / 1e9
    row["vs_copy"] = row["copy_peer_ms"] / row["fast_write_ms"]
    row["kv_only_vs_copy"] = row["copy_peer_ms"] / row["fast_kv_only_write_ms"]
    row["vs_copy_in_flow"] = row["copy_in_flow_ms"] / row["fast_write_ms"]
    row["stage_order_vs_copy"] = row["stage_order_copy_ms"] / row["stage_order_ms"]
    row["fast_vs_mooncake"] = row["fast_GB_s"] / row["mooncake_GB_s"]
    row["target_vs_copy"] = 0.5
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=30, help="fast path and copy repetitions")
    parser.add_argument("--mooncake-reps", type=int, default=4)
    parser.add_argument(
        "--cases",
        default=",".join(DEFAULT_CASES),
        help=f"comma-separated, of: {', '.join(name for name, _, _ in CASES)}",
    )
    add_same_gpu_flag(parser)
    args = parser.parse_args()
    cases = [c for c in CASES if c[0] in args.cases.split(",")]
    if not cases:
        parser.error(f"no known case in {args.cases!r}")
    multicast_off()
    prefill_gpu, decode_gpu = logical_gpus(2, args.same_gpu, FIGURE)
    same_gpu_banner(args.same_gpu)
    torch.cuda.set_device(prefill_gpu)
    peer = decode_peer(decode_gpu)
    fast = Prefill(peer, TransportConfig(hostname="127.0.0.1"), "fast")
    slow = Prefill(peer, TransportConfig(hostname="127.0.0.1", cuda_ipc=False), "tcp")
    decode_device = torch.device("cuda", decode_gpu)
    rows: list[dict[str, Any]] = []
    checks: dict[str, bool] = {}
    try:
        for case in cases:
            rows.append(measure_case(fast, slow, case, decode_device, args, checks))
            print(rows[-1], file=sys.stderr, flush=True)
    finally:
        fast.close()
        slow.close()
        peer.stop()
    write_report(
        FIGURE,
        rows,
        COLUMNS,
        {
            **topology([prefill_gpu, decode_gpu], args.same_gpu),
            "prefill_gpu": prefill_gpu,
            "decode_gpu": decode_gpu,
            "shape": SHAPE.__dict__,
            "checksums_equal": checks,
            "reps": args.reps,
            "mooncake_reps": args.mooncake_reps,
        },
    )
    if not all(checks.values()):
        sys.exit("KV arrived corrupted")


if __name__ == "__main__":
    main()
