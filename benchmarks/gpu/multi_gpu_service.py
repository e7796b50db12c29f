"""The whole service with its engine processes on GPUs of their own (issue #25): PD (prefill PP 2,
one stage per GPU, plus 2 decode replicas of one GPU each: 4 GPUs) against as many colocated
replicas as PD has GPUs (4, one GPU each), under the serving load at rising rates up to
saturation: TTFT, ITL, throughput.

This is service_bench.py with other defaults, nothing copied: the same checkpoints (`--shapes`,
default llama3-8b with random weights), the greedy PD == colocated check through the HTTP API,
the idle request's phase timeline, the serving load (serving_bench's mix, streamed) and the
report. Here every stage and replica asks Ray for whole GPUs (`--stage-gpus 1 --decode-gpus 1`),
`--decode-replicas 2`, the colocated replicas default to PD's GPU count, and the rates run
1..64 req/s with `--saturate`: each mode stops at the first rate that adds less than 10% tokens/s
over the one before, or serves errors. Across GPUs the stages' KV reaches the decode replicas
by the CUDA IPC fast path (peer access) and hidden states cross between the stages the same way;
the JSON keeps what the stages logged (`kv_path`) and the Ray GPU ids of every engine process
(`engine_gpus`), so a run where processes shared a GPU shows.

    python3 -m benchmarks.gpu.multi_gpu_service                       # 4 GPUs -> multi_gpu_service.json
    python3 -m benchmarks.gpu.multi_gpu_service --decode-replicas 1   # 3 GPUs (PP 2 + 1 decode)
    python3 -m benchmarks.gpu.multi_gpu_service --same-gpu --rates 1,4 --duration 5   # plumbing
    python3 -m benchmarks.gpu.multi_gpu_service --device cpu --rates 1 --duration 4   # CPU dry run

`--same-gpu` gives each logical GPU an equal share of cuda:0 and defaults to the small model
(four 8B engines do not fit one GPU); `--device cpu` runs the same deployments without GPUs.
Neither measures the target: the JSON says `same_gpu: true` or `cpu_dry_run: true`.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import torch

from benchmarks.gpu.multi_gpu import (
    add_same_gpu_flag,
    logical_gpus,
    multicast_off,
    same_gpu_banner,
    topology,
)
from benchmarks.gpu.service_bench import build_parser, parse, run

FIGURE = "multi_gpu_service"


def pd_gpus(args: argparse.Namespace) -> int:
    """Logical GPUs of the PD deployment: its stages and decode replicas, one GPU each by
    default (`--stage-gpus`, `--decode-gpus`)."""
    stages = args.pp * args.prefill_replicas * args.stage_gpus
    return math.ceil(stages + args.decode_replicas * args.decode_gpus - 1e-9)


def main() -> None:
    parser = build_parser()
    parser.description = __doc__
    parser.set_defaults(
        device="cuda",  # a CPU dry run only when asked for (`--device cpu`), never by default
        shapes=None,
        rates="1,2,4,8,16,32,64",
        saturate=True,
        warmup_rate=8.0,
        stage_gpus=1.0,
        decode_gpus=1.0,
        decode_replicas=2,
        colocated_replicas=None,
        name=FIGURE,
    )
    add_same_gpu_flag(parser)
    args = parse(parser)
    if args.same_gpu and args.device != "cuda":
        parser.error("--same-gpu maps GPUs onto cuda:0; it needs --device cuda")
    needed = pd_gpus(args)
    if args.colocated_replicas is None:  # colocated on as many GPUs as PD
        args.colocated_replicas = max(1, round(needed / args.decode_gpus))
    needed = max(needed, math.ceil(args.colocated_replicas * args.decode_gpus - 1e-9))
    if args.shapes is None:
        args.shapes = "small" if args.same_gpu or args.device == "cpu" else "llama3-8b"
    multicast_off()
    extra: dict[str, Any] = {"figure": FIGURE, "gpus_needed": needed, "pd_gpus": pd_gpus(args)}
    if args.device == "cuda":
        devices = logical_gpus(needed, args.same_gpu, FIGURE)
        same_gpu_banner(args.same_gpu)
        if args.same_gpu:  # each logical GPU: an equal share of cuda:0, within Ray's precision
            share = round(1 / needed - 5e-5, 4)
            args.stage_gpus *= share
            args.decode_gpus *= share
            extra["gpu_share"] = share
        extra |= topology(devices, args.same_gpu)
    else:
        extra |= {"same_gpu": False, "cpu_dry_run": True, "gpus_present": torch.cuda.device_count()}
    run(args, extra)


if __name__ == "__main__":
    main()
