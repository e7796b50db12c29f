"""Batched paged decode on one GPU against the HBM floor: step time at batch 1, 8, 32, 128.

Shapes: Qwen2-1.5B-like and Llama-3-8B-like (engine/testmodel.py `REALISTIC_SHAPES`), bf16,
random weights made on the device, every request holding `--context` tokens of random KV on
scattered pages. A step is what the engine does per decode iteration: `StageRunner.forward`
(metadata packed on the host, one upload, CUDA graph replay) and the argmax copied back to
the host (`.tolist()`, the step's one sync). Contexts grow by one token per step.

The same shapes and batches then run through the whole engine, `LLM.step` in steady state
(requests with `--context`-token prompts decoding, no detokenizer: the stage has random weights
and no tokenizer), first synchronous, then with async scheduling, on the same requests:
`llm_sync_ms` and `llm_async_ms` are medians of the wall time of one `step()` call.

Floor: the bytes a step must read (every weight once: layers, final norm, LM head; the KV of
every request) over the device-to-device copy bandwidth measured in the same run (bytes read
plus written per second). Target: within 2x of it at batch 1 for the 1.5B shape.

    python -m benchmarks.gpu.engine_decode_bench   # JSON to $OUT, else benchmarks/results/
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from benchmarks.report import write_report
from engine.attention import SeqChunk
from engine.kv_cache import KVCacheSpec, PagedKVCache
from engine.llm import LLM, EngineConfig
from engine.runner import StageRunner
from engine.sampling_params import SamplingParams
from engine.testmodel import REALISTIC_SHAPES, random_stage


def copy_bandwidth(nbytes: int = 2 << 30, reps: int = 20) -> float:
    """Bytes read + written per second by one large device-to-device copy (median)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(reps + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * nbytes / statistics.median(times[3:])


def weight_bytes_read(stage) -> int:
    """Every parameter once, except the embedding table (a few rows are read) unless it is
    also the LM head."""
    seen, total = set(), 0
    for name, p in stage.named_parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        if name.startswith("embed_tokens.") and stage.lm_head.weight is not p:
            continue
        total += p.numel() * p.element_size()
    return total


def timed_steps(runner, chunks_for, ids, steps: int) -> tuple[float, float]:
    """Median ms per step as the engine runs it (forward, then the argmax copied to the host:
    the step's one sync), and mean ms per step issued back to back with one sync at the end
    (the host prepares the next step while the GPU runs this one: device-bound time)."""
    walls = []
    for i in range(steps):
        t0 = time.perf_counter()
        runner.forward(chunks_for(i), ids).argmax(dim=-1).tolist()
        walls.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(steps):
        runner.forward(chunks_for(i), ids).argmax(dim=-1)
    torch.cuda.synchronize()
    return statistics.median(walls), (time.perf_counter() - t0) * 1e3 / steps


def llm_step_ms(llm: LLM, batch: int, context: int, steps: int) -> tuple[float, float, float]:
    """Median wall ms of one `LLM.step()` call while `batch` requests decode, synchronous and
    with async scheduling (same requests, the mode switched between the two runs), and the
    mean context length over the timed steps."""
    vocab = llm.model_config.vocab_size
    params = SamplingParams(temperature=0, max_tokens=4 * steps + 64, ignore_eos=True)
    rids = [
        llm.add_request(torch.randint(0, vocab, (context,)).tolist(), params) for _ in range(batch)
    ]
    llm.async_scheduling = False
    while llm.scheduler.waiting:  # prefill every prompt
        llm.step()
    results = []
    for mode in (False, True):
        llm.async_scheduling = mode
        for _ in range(5):  # decode graphs captured, the pipeline full
            llm.step()
        walls = []
        for _ in range(steps):
            t0 = time.perf_counter()
            llm.step()
            walls.append((time.perf_counter() - t0) * 1e3)
        results.append(statistics.median(walls))
    mean_context = context + 5 + steps + 5 + steps // 2
    for rid in rids:
        llm.abort(rid)
    assert llm.allocator.num_in_use == 0 and not llm.has_unfinished()
    return results[0], results[1], mean_context


def bench_shape(name: str, batches: list[int], context: int, steps: int, bw: float) -> list[dict]:
    config = REALISTIC_SHAPES[name]
    stage = random_stage(config, device="cuda", dtype=torch.bfloat16, seed=0)
    page = 16
    per_request = -(-(context + 2 * steps + 8) // page)
    max_batch = max(batches)
    spec = KVCacheSpec(
        per_request * max_batch + 16,
        page,
        config.num_key_value_heads,
        config.head_dim,
        torch.bfloat16,
    )
    cache = PagedKVCache(spec, 0, config.num_hidden_layers, device="cuda")
    for layer in cache.layers:
        layer.normal_()  # never time on zeros
    graphs = StageRunner(stage, cache, max_decode_batch=max_batch)
    eager = StageRunner(stage, cache, max_decode_batch=max_batch, cuda_graphs=False)
    pages = random.Random(0).sample(range(spec.num_pages), spec.num_pages)
    w_bytes = weight_bytes_read(stage)
    kv_token_bytes = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 2
    rows = []
    for batch in batches:
        tables = [pages[i * per_request : (i + 1) * per_request] for i in range(batch)]
        ids = torch.randint(0, config.vocab_size, (batch,))

        def chunks_for(i: int, tables=tables, batch=batch) -> list[SeqChunk]:
            return [SeqChunk(context + i, 1, tables[j]) for j in range(batch)]

        timed_steps(graphs, chunks_for, ids, 3)  # capture and warm up
        step_ms, pipelined_ms = timed_steps(graphs, chunks_for, ids, steps)
        timed_steps(eager, chunks_for, ids, 2)
        eager_ms, _ = timed_steps(eager, chunks_for, ids, max(3, steps // 4))
        kv_bytes = batch * (context + steps // 2) * kv_token_bytes
        floor_ms = (w_bytes + kv_bytes) / bw * 1e3
        rows.append(
            {
                "shape": name,
                "batch": batch,
                "context": context,
                "step_ms": step_ms,
                "pipelined_ms": pipelined_ms,
                "eager_ms": eager_ms,
                "floor_ms": floor_ms,
                "x_floor": step_ms / floor_ms,
                "tok_s": batch / step_ms * 1e3,
                "weight_GB": w_bytes / 1e9,
                "kv_GB": kv_bytes / 1e9,
            }
        )
        print(rows[-1], flush=True)
    del graphs, eager, cache
    torch.cuda.empty_cache()

    # The whole engine over the same weights: its own KV cache, scheduler and sampler.
    llm = LLM(
        EngineConfig(
            model=name,
            device="cuda",
            dtype="bfloat16",
            num_pages=max_batch * -(-(context + 4 * steps + 80) // page) + 16,
            max_num_seqs=max_batch,
            max_num_batched_tokens=max(2048, context),
        ),
        stage=stage,
    )
    for row in rows:
        sync_ms, async_ms, mean_context = llm_step_ms(llm, row["batch"], context, steps)
        floor_ms = (w_bytes + row["batch"] * mean_context * kv_token_bytes) / bw * 1e3
        row |= {
            "llm_sync_ms": sync_ms,
            "llm_async_ms": async_ms,
            "llm_floor_ms": floor_ms,
            "llm_sync_x_floor": sync_ms / floor_ms,
            "llm_async_x_floor": async_ms / floor_ms,
            "llm_async_tok_s": row["batch"] / async_ms * 1e3,
        }
        print({k: v for k, v in row.items() if k.startswith("llm")}, flush=True)
    del llm, stage
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shapes", nargs="+", default=list(REALISTIC_SHAPES))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()

    bw = copy_bandwidth()
    print(f"device-to-device copy: {bw / 1e12:.2f} TB/s (read + write)", flush=True)
    rows = []
    for name in args.shapes:
        rows += bench_shape(name, args.batches, args.context, args.steps, bw)
    write_report(
        "engine_decode_gpu",
        rows,
        [
            "shape",
            "batch",
            "context",
            "step_ms",
            "pipelined_ms",
            "eager_ms",
            "floor_ms",
            "x_floor",
            "tok_s",
            "llm_sync_ms",
            "llm_async_ms",
            "llm_sync_x_floor",
            "llm_async_x_floor",
            "llm_async_tok_s",
        ],
        extra={"copy_bandwidth_TBps": bw / 1e12, "args": vars(args)},
    )


if __name__ == "__main__":
    main()
