"""The whole service on one GPU: PD (prefill PP=2 + decode, KV over CUDA IPC) answers the same
greedy tokens as colocated, through the HTTP API.

Skipped without CUDA (CI has none) or without Ray Serve (a lent GPU machine gets it from the
carried wheels: benchmarks/gpu/carry.py, then `common.py setup`). Ray runs on this machine with
its one GPU; every engine process takes a quarter of it. The model is the small generated one
(llama family, bf16 on the GPU).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PROMPTS = ["The quick brown fox", "pdserve serves", "1 2 3 4 5 6 7 8", "What is 2+2?"]
MAX_TOKENS = 24


@contextlib.contextmanager
def pd_and_colocated(
    model_dir: Path, num_gpus: int, gpus_per_engine: float, prefix: str
) -> Iterator[dict[str, str]]:
    """PD (PP=2 + decode) and colocated served side by side on a local Ray with `num_gpus`
    GPUs, each engine process taking `gpus_per_engine` of them; yields each mode's base URL."""
    pytest.importorskip("ray.serve", reason="needs Ray Serve (carried wheels on a GPU machine)")
    import ray
    from ray import serve

    from benchmarks.gpu.service_bench import MODEL_NAME, free_port
    from deployments.app import AppConfig, build_service
    from deployments.serve_cli import set_ray_environment

    set_ray_environment("disabled")
    ray.init(
        address="local", num_gpus=num_gpus, num_cpus=8, include_dashboard=False, log_to_driver=False
    )
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    config = AppConfig(
        model=str(model_dir),
        served_model_name=MODEL_NAME,
        pp_size=2,
        num_gpus_per_stage=gpus_per_engine,
        decode_num_gpus=gpus_per_engine,
        num_cpus_per_stage=0.5,
        decode_num_cpus=0.5,
        prefill_num_pages=256,
        decode_num_pages=512,
    )
    names = {mode: f"{prefix}-{mode}" for mode in ("pd", "colocated")}
    try:
        for mode, name in names.items():
            serve.run(build_service(config, mode), name=name, route_prefix=f"/{name}")
        yield {mode: f"http://127.0.0.1:{port}/{name}" for mode, name in names.items()}
    finally:
        serve.shutdown()
        ray.shutdown()


def assert_same_greedy_answers(urls: dict[str, str], prompts: list[str], max_tokens: int) -> None:
    """PD and colocated answer every prompt with the same greedy text, whole and streamed."""
    from benchmarks.gpu.service_bench import greedy_outputs

    pd = asyncio.run(greedy_outputs(urls["pd"], prompts, max_tokens))
    colocated = asyncio.run(greedy_outputs(urls["colocated"], prompts, max_tokens))
    for a, b in zip(pd, colocated, strict=True):
        assert a["tokens"] == b["tokens"] == max_tokens, (a, b)
        assert a["text"], a
        assert a["text"] == b["text"], (a, b)
        assert a["streamed_text"] == a["text"] and b["streamed_text"] == b["text"], (a, b)


@pytest.fixture(scope="module")
def urls(llama_dir) -> Iterator[dict[str, str]]:
    with pd_and_colocated(llama_dir, 1, 0.25, "gpu") as served:  # 3/4 + 1/4 of the GPU
        yield served


def test_pd_and_colocated_answer_the_same_greedy_tokens_on_one_gpu(urls) -> None:
    assert_same_greedy_answers(urls, PROMPTS, MAX_TOKENS)


def test_the_kv_goes_over_cuda_ipc_and_every_phase_is_measured(urls) -> None:
    """The prefill stages' log says the fast path serves decode (no Mooncake fallback), and one
    request adds a sample to every phase of its time to first token."""
    from benchmarks.gpu.service_bench import kv_path, phase_sums, timed_request

    before = phase_sums(urls["pd"])
    asyncio.run(timed_request(urls["pd"], "alpha beta gamma", 2))
    after = phase_sums(urls["pd"])
    grew = {p for p in after if after[p][1] > before.get(p, (0, 0))[1]}
    assert {"forward", "kv_transfer", "prefill_call", "join"} <= grew
    path = kv_path()
    assert path["cuda_ipc"] >= 1 and path["fallback_to_mooncake"] == 0, path
