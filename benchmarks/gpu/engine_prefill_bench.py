"""Prefill throughput on one GPU against the bf16 matrix-unit floor: 512, 2k and 8k tokens.

Shapes: Qwen2-1.5B-like and Llama-3-8B-like (engine/testmodel.py `REALISTIC_SHAPES`), bf16,
random weights made on the device. A step is one `StageRunner.forward` of a whole prompt (or
of a batch of prompts) into paged KV, logits of each prompt's last token out: steps of up to
2048 tokens replay a CUDA graph, longer ones run eagerly (`eager_ms`: every step eagerly).

FLOPs counted: 2 per multiply-add of every linear over every token (the LM head over the logit
rows only), plus causal attention (QK^T and PV over the lower triangle). MFU is FLOP/s over the
bf16 matmul peak measured in the same run (an 8192^3 product on random data), and over the
989 TFLOP/s dense H100 SXM spec. Target: at least 40% MFU.

    python -m benchmarks.gpu.engine_prefill_bench   # JSON to $OUT, else benchmarks/results/
    python -m benchmarks.gpu.engine_prefill_bench --profile qwen2-1.5b:1x512   # + kernel table
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from collections.abc import Collection

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.report import write_report
from engine.attention import SeqChunk
from engine.kv_cache import KVCacheSpec, PagedKVCache
from engine.runner import StageRunner
from engine.testmodel import REALISTIC_SHAPES, random_stage

SPEC_TFLOPS = 989.0  # H100 SXM dense bf16


def cuda_ms(fn, reps: int, warmup: int = 2) -> float:
    times = []
    for i in range(warmup + reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def matmul_peak(n: int = 8192) -> float:
    """FLOP/s of an n^3 bf16 matmul on random data (median of several, three operand sets)."""
    sets = [
        (
            torch.randn(n, n, device="cuda", dtype=torch.bfloat16),
            torch.randn(n, n, device="cuda", dtype=torch.bfloat16),
        )
        for _ in range(3)
    ]
    i = iter(range(10**9))

    def run():
        a, b = sets[next(i) % 3]
        torch.mm(a, b)

    ms = cuda_ms(run, reps=15, warmup=5)
    return 2 * n**3 / (ms / 1e3)


def prefill_flops(config, prompts: list[int]) -> float:
    h, d = config.hidden_size, config.head_dim
    per_token = (
        h * (config.q_size + 2 * config.kv_size)
        + config.q_size * h
        + 3 * h * config.intermediate_size
    )
    tokens = sum(prompts)
    linear = 2 * tokens * per_token * config.num_hidden_layers
    head = 2 * len(prompts) * h * config.vocab_size
    # Causal: query i attends to i + 1 keys; QK^T and PV each 2 * D FLOPs per pair and head.
    pairs = sum(n * (n + 1) // 2 for n in prompts)
    attention = 4 * d * config.num_attention_heads * pairs * config.num_hidden_layers
    return linear + head + attention


KERNEL_KINDS = [  # (what, substrings of kernel names), first match wins
    ("rmsnorm (triton)", ("rms_norm",)),
    ("silu_mul (triton)", ("silu_mul",)),
    ("rotary + kv write (triton)", ("rotary",)),
    ("attention", ("flash", "fmha", "sdpa", "attn")),
    ("gemm", ("gemm", "gemv", "nvjet", "xmma", "cutlass", "splitk")),
    ("copy / memset", ("memcpy", "memset", "copy")),
]


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in low for k in keys)), "other")


def kernel_table(runner: StageRunner, chunks, ids, steps: int = 3) -> None:
    """Device time per step by kind of kernel and the top kernels (torch.profiler, CUPTI:
    kernels inside a replayed CUDA graph are seen one by one)."""
    for _ in range(3):
        runner.forward(chunks, ids)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            runner.forward(chunks, ids)
        torch.cuda.synchronize()
    kernels: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)
        if us > 0 and "CPU" not in str(getattr(e, "device_type", "")):
            kernels[e.key][0] += us / steps
            kernels[e.key][1] += e.count / steps
    total = sum(t for t, _ in kernels.values())
    kinds: dict[str, float] = defaultdict(float)
    for name, (us, _) in kernels.items():
        kinds[kernel_kind(name)] += us
    print(f"kernel time per step: {total / 1e3:.3f} ms")
    for kind, us in sorted(kinds.items(), key=lambda kv: -kv[1]):
        print(f"  {us / 1e3:7.3f} ms  {100 * us / total:5.1f}%  {kind}")
    print("  top kernels: us per step, launches per step")
    for name, (us, count) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:12]:
        print(f"  {us:8.1f}  {count:4.0f}  {name[:110]}")


def bench_shape(
    name: str, cases: list[tuple[int, int]], peak: float, profiled: Collection[str] = ()
) -> list[dict]:
    config = REALISTIC_SHAPES[name]
    stage = random_stage(config, device="cuda", dtype=torch.bfloat16, seed=0)
    page = 16
    most = max(b * -(-n // page) for b, n in cases)
    spec = KVCacheSpec(most + 16, page, config.num_key_value_heads, config.head_dim, torch.bfloat16)
    cache = PagedKVCache(spec, 0, config.num_hidden_layers, device="cuda")
    runner = StageRunner(stage, cache)
    eager = StageRunner(stage, cache, cuda_graphs=False)
    rows = []
    for batch, length in cases:
        per = -(-length // page)
        chunks = [SeqChunk(0, length, list(range(i * per, (i + 1) * per))) for i in range(batch)]
        ids = torch.randint(0, config.vocab_size, (batch * length,))
        ms = cuda_ms(lambda c=chunks, i=ids, r=runner: r.forward(c, i), reps=5)
        eager_ms = cuda_ms(lambda c=chunks, i=ids, r=eager: r.forward(c, i), reps=3)
        flops = prefill_flops(config, [length] * batch)
        achieved = flops / (ms / 1e3)
        rows.append(
            {
                "shape": name,
                "prompts": f"{batch}x{length}",
                "tokens": batch * length,
                "ms": ms,
                "eager_ms": eager_ms,
                "tok_s": batch * length / ms * 1e3,
                "TFLOP": flops / 1e12,
                "TFLOP_s": achieved / 1e12,
                "mfu_measured": achieved / peak,
                "mfu_spec": achieved / (SPEC_TFLOPS * 1e12),
                "floor_ms": flops / peak * 1e3,
            }
        )
        print(rows[-1], flush=True)
        if f"{name}:{batch}x{length}" in profiled:
            print(f"--- profile of {name} {batch}x{length} (graph replay where one is used)")
            kernel_table(runner, chunks, ids)
    del runner, eager, stage, cache
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shapes", nargs="+", default=list(REALISTIC_SHAPES))
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument(
        "--batched", type=int, default=16, help="also this many 512-token prompts in one step"
    )
    parser.add_argument(
        "--profile", nargs="*", default=[], help="cases to profile, as SHAPE:BxN (qwen2-1.5b:1x512)"
    )
    args = parser.parse_args()

    peak = matmul_peak()
    print(f"bf16 matmul peak (8192^3, random): {peak / 1e12:.0f} TFLOP/s", flush=True)
    cases = [(1, n) for n in args.lengths] + ([(args.batched, 512)] if args.batched else [])
    rows = []
    for name in args.shapes:
        rows += bench_shape(name, cases, peak, set(args.profile))
    write_report(
        "engine_prefill_gpu",
        rows,
        [
            "shape",
            "prompts",
            "ms",
            "eager_ms",
            "tok_s",
            "TFLOP_s",
            "mfu_measured",
            "mfu_spec",
            "floor_ms",
        ],
        extra={"matmul_peak_TFLOPs": peak / 1e12, "spec_TFLOPs": SPEC_TFLOPS, "args": vars(args)},
    )


if __name__ == "__main__":
    main()
