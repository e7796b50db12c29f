"""Per-hop cost of pipeline-parallel prefill: 2 stages in 2 processes on one GPU vs one stage.

Model: a Qwen2-1.5B-like decoder (28 layers, hidden 1536, 12 heads, 2 KV heads of 128,
intermediate 8960, vocab 151936, bfloat16) with random weights generated on the GPU, built
from the engine's public pieces (`DecoderStage`, `LayerRange`, `split_layers`, `PagedKVCache`,
`AttentionMetadata`, `SeqChunk`). One prompt of T tokens, prefilled in one chunk:

- `one stage`: the whole model in this process;
- `split, 1 process`: stage 0 then stage 1 in this process (the split alone);
- `2 processes, event`: stage 0 here, stage 1 in a spawned process; stage 0 copies its hidden
  states into stage 1's input buffer through CUDA IPC (transport/cuda_ipc/), records an
  interprocess CUDA event and tells stage 1 over a pipe; stage 1 queues its work behind the
  event, so neither side waits on the host for the GPU;
- `2 processes, sync`: the same, but stage 0 waits for its stream before telling stage 1.

Time runs from a synchronized start in this process to stage 1's synchronized end (both read
CLOCK_MONOTONIC). Per-hop overhead, two ways: end to end (`e2e_hop_*`: 2-process time minus
one-stage time, as noisy as the forward), and the hop alone (`hop_*`: copy the hidden states
over, signal, stage 1 reads them, minus the same copy and read in one process). Stage 1's logits in
the other process must match the in-process split's (the hidden states crossed intact).
Limit (`floor_hop_ms`, measured here): what a hop cannot avoid, the copy of the hidden states
into the next stage's buffer (CUDA events) plus one pipe message (half a measured round trip).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import time
from typing import Any

import torch

from benchmarks.report import write_report

LENGTHS = (512, 1024, 2048, 4096, 8192)
PAGE = 16


def qwen2_1p5b_like() -> Any:
    from engine.testmodel import REALISTIC_SHAPES

    return REALISTIC_SHAPES["qwen2-1.5b"]


def random_stage(config: Any, layers: Any, seed: int, device: torch.device | str = "cuda") -> Any:
    """The stage of `layers`, random bf16 weights drawn on `device` (the same for one seed on
    GPUs of one model: multi_gpu_pp.py draws a stage on each GPU)."""
    from engine.testmodel import random_stage as draw

    return draw(config, layers, device=device, dtype=torch.bfloat16, seed=seed).eval()


def kv_cache(config: Any, layers: Any, max_tokens: int, device: torch.device | str = "cuda") -> Any:
    from engine.kv_cache import KVCacheSpec, PagedKVCache

    spec = KVCacheSpec(
        num_pages=max_tokens // PAGE + 1,
        page_size=PAGE,
        num_kv_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        dtype=torch.bfloat16,
    )
    return PagedKVCache(spec, first_layer=layers.start, num_layers=len(layers), device=device)


def metadata(tokens: int, device: torch.device | str = "cuda") -> Any:
    """One fresh prompt of `tokens` tokens in one chunk, its pages from 0."""
    from engine.attention import AttentionMetadata, SeqChunk

    chunk = SeqChunk(start=0, num_new=tokens, pages=list(range(-(-tokens // PAGE))))
    return AttentionMetadata.build([chunk], PAGE, torch.device(device))


def _second_stage(conn: Any, max_tokens: int, seed: int) -> None:
    """Stage 1 in its own process: waits for hidden states in its IPC-exported input buffer."""
    from engine.layer_range import split_layers
    from transport.cuda_ipc.backend import CudaIpc

    torch.cuda.set_device(0)
    config = qwen2_1p5b_like()
    layers = split_layers(config.num_hidden_layers, 2)[1]
    stage = random_stage(config, layers, seed)
    cache = kv_cache(config, layers, max_tokens)
    hidden = torch.empty(max_tokens, config.hidden_size, dtype=torch.bfloat16, device="cuda")
    allocation = CudaIpc().export(hidden)
    assert allocation is not None, "cannot export the input buffer"
    torch.cuda.synchronize()
    conn.send((allocation.model_dump(), hidden.data_ptr() - allocation.base))
    event = torch.cuda.Event.from_ipc_handle(torch.device("cuda", 0), conn.recv())
    metas: dict[int, Any] = {}
    while True:
        cmd, *args = conn.recv()
        if cmd == "stop":
            conn.send(None)
            return
        if cmd == "ping":
            conn.send(time.perf_counter())
        elif cmd == "meta":
            metas[args[0]] = metadata(args[0])
            torch.cuda.synchronize()
            conn.send(None)
        elif cmd == "handoff":  # the hop alone: wait for the hidden states, read them once
            tokens, wait_on_event = args
            if wait_on_event:
                torch.cuda.current_stream().wait_event(event)
            hidden[:tokens].sum()
            torch.cuda.synchronize()
            conn.send(time.perf_counter())
        elif cmd == "go":
            tokens, wait_on_event = args
            if wait_on_event:
                torch.cuda.current_stream().wait_event(event)
            logits = stage(hidden[:tokens], metas[tokens], cache)
            torch.cuda.synchronize()
            end = time.perf_counter()
            conn.send((end, logits.float().cpu()))


class _DeviceArray:
    """bf16 device memory at an address, for `torch.as_tensor` (`__cuda_array_interface__`)."""

    def __init__(self, address: int, shape: tuple[int, ...]) -> None:
        self.__cuda_array_interface__ = {
            "shape": shape,
            "typestr": "<f2",  # read as float16, viewed back as bfloat16 below
            "data": (address, False),
            "version": 2,
        }


class SecondStage:
    def __init__(self, max_tokens: int, seed: int, event: torch.cuda.Event) -> None:
        from transport.cuda_ipc.backend import CudaIpc
        from transport.receiver_info import IpcAllocation

        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(
            target=_second_stage, args=(child, max_tokens, seed), daemon=True
        )
        self.process.start()
        if not self.conn.poll(300):
            raise TimeoutError("stage 1 did not start")
        raw, offset = self.conn.recv()
        self.ipc = CudaIpc()
        self.allocation = IpcAllocation.model_validate(raw)
        self.mapped = self.ipc.open(self.allocation, torch.device("cuda", 0))
        hidden = qwen2_1p5b_like().hidden_size
        array = _DeviceArray(self.mapped + offset, (max_tokens, hidden))
        self.input = torch.as_tensor(array).view(torch.bfloat16)  # stage 1's input buffer
        self.conn.send(event.ipc_handle())

    def call(self, *msg: Any) -> Any:
        self.conn.send(msg)
        if not self.conn.poll(300):
            raise TimeoutError(f"stage 1 did not answer {msg[0]}")
        return self.conn.recv()

    def close(self) -> None:
        try:
            self.call("stop")
        finally:
            self.process.join(30)
            del self.input
            self.ipc.close(self.mapped, torch.device("cuda", 0))


def main() -> None:
    from engine.layer_range import LayerRange, split_layers

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=20, help="end-to-end repetitions")
    parser.add_argument("--hop-reps", type=int, default=50, help="hop-alone repetitions")
    parser.add_argument("--lengths", type=int, nargs="*", default=list(LENGTHS))
    args = parser.parse_args()
    torch.cuda.set_device(0)
    max_tokens = max(args.lengths)
    config = qwen2_1p5b_like()
    first, second = split_layers(config.num_hidden_layers, 2)
    seed = 1234
    build_start = time.perf_counter()
    event = torch.cuda.Event(interprocess=True)
    remote = SecondStage(max_tokens, seed, event)  # builds while this process builds its own
    stage0 = random_stage(config, first, seed + 1)
    stage1 = random_stage(config, second, seed)  # the same weights as the other process's
    whole = random_stage(config, LayerRange(0, config.num_hidden_layers), seed + 2)
    kv0, kv1 = kv_cache(config, first, max_tokens), kv_cache(config, second, max_tokens)
    kv_whole = kv_cache(config, LayerRange(0, config.num_hidden_layers), max_tokens)
    torch.cuda.synchronize()
    print(f"built in {time.perf_counter() - build_start:.1f}s", file=sys.stderr, flush=True)
    gen = torch.Generator().manual_seed(0)
    rows = []
    try:
        for tokens in args.lengths:
            ids = torch.randint(0, config.vocab_size, (tokens,), generator=gen).cuda()
            meta = metadata(tokens)
            remote.call("meta", tokens)

            def one_stage(ids=ids, meta=meta) -> float:
                torch.cuda.synchronize()
                start = time.perf_counter()
                whole(ids, meta, kv_whole)
                torch.cuda.synchronize()
                return time.perf_counter() - start

            def split_here(ids=ids, meta=meta) -> tuple[float, torch.Tensor]:
                torch.cuda.synchronize()
                start = time.perf_counter()
                logits = stage1(stage0(ids, meta, kv0), meta, kv1)
                torch.cuda.synchronize()
                return time.perf_counter() - start, logits

            def two_processes(
                with_event: bool, ids=ids, meta=meta, tokens=tokens
            ) -> tuple[float, torch.Tensor]:
                torch.cuda.synchronize()
                start = time.perf_counter()
                hidden = stage0(ids, meta, kv0)
                remote.input[:tokens].copy_(hidden)
                if with_event:
                    event.record()
                else:
                    torch.cuda.current_stream().synchronize()
                end, logits = remote.call("go", tokens, with_event)
                return end - start, logits

            # The hop alone, against the same copy and read in one process.
            hidden_now = torch.randn(tokens, config.hidden_size, device="cuda").to(torch.bfloat16)
            local_input = torch.empty_like(hidden_now)

            def hop_here(hidden_now=hidden_now, local_input=local_input) -> float:
                torch.cuda.synchronize()
                start = time.perf_counter()
                local_input.copy_(hidden_now)
                local_input.sum()
                torch.cuda.synchronize()
                return time.perf_counter() - start

            def hop_there(with_event: bool, hidden_now=hidden_now, tokens=tokens) -> float:
                torch.cuda.synchronize()
                start = time.perf_counter()
                remote.input[:tokens].copy_(hidden_now)
                if with_event:
                    event.record()
                else:
                    torch.cuda.current_stream().synchronize()
                return remote.call("handoff", tokens, with_event) - start

            hops: dict[str, list[float]] = {"here": [], "event": [], "sync": []}
            for i in range(args.hop_reps + 5):
                here, ev, sy = hop_here(), hop_there(True), hop_there(False)
                if i >= 5:
                    hops["here"].append(here)
                    hops["event"].append(ev)
                    hops["sync"].append(sy)
            hop = {k: 1e3 * statistics.median(v) for k, v in hops.items()}
            copy_times = []
            for _ in range(args.hop_reps + 3):
                begin = torch.cuda.Event(enable_timing=True)
                done = torch.cuda.Event(enable_timing=True)
                begin.record()
                remote.input[:tokens].copy_(hidden_now)
                done.record()
                done.synchronize()
                copy_times.append(begin.elapsed_time(done))
            copy_ms = statistics.median(copy_times[3:])
            rtts = []
            for _ in range(50):
                sent = time.perf_counter()
                remote.call("ping")
                rtts.append(time.perf_counter() - sent)
            floor_ms = copy_ms + 1e3 * statistics.median(rtts) / 2

            for _ in range(3):  # warm up every path (Triton compiles, cuBLAS picks kernels)
                one_stage(), split_here(), two_processes(True), two_processes(False)
            times: dict[str, list[float]] = {"one": [], "split": [], "event": [], "sync": []}
            for _ in range(args.reps):  # interleaved, so drift hits every mode alike
                times["one"].append(one_stage())
                t, here = split_here()
                times["split"].append(t)
                t, there = two_processes(True)
                times["event"].append(t)
                times["sync"].append(two_processes(False)[0])
            same = torch.allclose(here.cpu(), there, rtol=1e-2, atol=1e-2)
            med = {k: 1e3 * statistics.median(v) for k, v in times.items()}
            rows.append(
                {
                    "tokens": tokens,
                    "one_stage_ms": med["one"],
                    "split_1proc_ms": med["split"],
                    "two_proc_event_ms": med["event"],
                    "two_proc_sync_ms": med["sync"],
                    "e2e_hop_event_ms": med["event"] - med["one"],
                    "e2e_hop_sync_ms": med["sync"] - med["one"],
                    "e2e_hop_event_vs_split_ms": med["event"] - med["split"],
                    "hop_event_ms": hop["event"] - hop["here"],
                    "hop_sync_ms": hop["sync"] - hop["here"],
                    "handoff_here_ms": hop["here"],
                    "handoff_event_ms": hop["event"],
                    "handoff_sync_ms": hop["sync"],
                    "hidden_MiB": tokens * config.hidden_size * 2 / 2**20,
                    "hidden_copy_ms": copy_ms,
                    "pipe_rtt_ms": 1e3 * statistics.median(rtts),
                    "floor_hop_ms": floor_ms,
                    "logits_match": same,
                    "spread_one_ms": 1e3 * (max(times["one"]) - min(times["one"])),
                    "spread_event_ms": 1e3 * (max(times["event"]) - min(times["event"])),
                }
            )
            print(rows[-1], file=sys.stderr, flush=True)
    finally:
        remote.close()
    write_report(
        "stage_hop_gpu",
        rows,
        [
            "tokens",
            "one_stage_ms",
            "split_1proc_ms",
            "two_proc_event_ms",
            "two_proc_sync_ms",
            "e2e_hop_event_ms",
            "e2e_hop_sync_ms",
            "hop_event_ms",
            "hop_sync_ms",
            "floor_hop_ms",
            "logits_match",
        ],
        {"config": {k: str(v) for k, v in config.__dict__.items()}, "reps": args.reps},
    )
    if not all(r["logits_match"] for r in rows):
        sys.exit("stage 1's logits in the other process differ from the in-process split's")


if __name__ == "__main__":
    main()
