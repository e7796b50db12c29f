"""Prefill with pipeline parallelism across GPUs: PP 2 and 4, one stage per GPU, hidden states GPU
to GPU, against one stage on one GPU (issue #25).

Model: the Llama-3-8B shape (`REALISTIC_SHAPES["llama3-8b"]`: 32 layers, hidden 4096, 32 heads,
8 KV heads of 128, intermediate 14336, vocab 128256, bf16) with random weights drawn on each GPU
by stage_hop_bench's pieces (`random_stage`, `kv_cache`, `metadata`). Stage 0 runs in this
process on GPU 0, stage k in a spawned process on GPU k. Hidden states cross through the real
channel (cluster/hidden_channel.py, forced to `ipc`): the consumer's slots exported with CUDA
IPC, the producer's copy into them on its own stream, "produced"/"consumed" events, no host
waits; the small handoffs travel over pipes, forwarded by this process the way `StageGroup.step`
chains the stages' step calls (each stage answers once its work is queued).

Per PP size and prompt length T (one prompt, one chunk, no sampling, no KV sends):
- TTFT (`*_ms`): from a synchronized start here to the last stage's synchronized end
  (CLOCK_MONOTONIC on both sides): `one_stage_ms` the whole model on GPU 0, `pp_ms` the stages on
  their GPUs, `split_1gpu_ms` the same stages one after another in this process on GPU 0 (the
  split without the hops; its logits are what the last stage's must match);
- prefill throughput (`*_tok_s`): `--batch` prompts of T tokens back to back, one step each as
  the controller issues them: the one stage takes them in turn; the pipeline overlaps them
  (stage k on prompt i while stage k+1 is on prompt i-1). `tput_x` = PP / one stage (ideal: N);
- per hop: `e2e_hop_ms` = (pp - split_1gpu) / (N - 1); the hop alone (`hop_ms`: stage 0's
  output through the channel into stage 1, which reads it and synchronizes, minus the same copy
  and read within GPU 0, like stage_hop_bench's); its floor (`floor_hop_ms`): one copy of the
  hidden states from GPU 0 to GPU 1 (CUDA events) plus half a pipe round trip; `hop_vs_floor`.

    python3 -m benchmarks.gpu.multi_gpu_pp                   # 4 GPUs -> multi_gpu_pp.json
    python3 -m benchmarks.gpu.multi_gpu_pp --pp 2            # 2 GPUs
    python3 -m benchmarks.gpu.multi_gpu_pp --same-gpu        # the plumbing on one GPU
    python3 -m benchmarks.gpu.multi_gpu_pp --device cpu --lengths 32 --reps 2 --hop-reps 3

`--same-gpu` puts every stage on cuda:0 (the channel is then CUDA IPC within one GPU);
`--device cpu` runs the processes and pipes on the CPU with a `tiny` model and the host channel.
Neither measures the target: the JSON says `same_gpu: true` or `cpu_dry_run: true`.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing as mp
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.gpu.multi_gpu import (
    add_same_gpu_flag,
    logical_gpus,
    multicast_off,
    same_gpu_banner,
    topology,
)
from benchmarks.gpu.stage_hop_bench import kv_cache, metadata, random_stage
from benchmarks.report import write_report

FIGURE = "multi_gpu_pp"
LENGTHS = (512, 2048, 8192)
SEED = 1234
COLUMNS = [
    "pp",
    "tokens",
    "same_gpu",
    "one_stage_ms",
    "split_1gpu_ms",
    "pp_ms",
    "ttft_x",
    "one_stage_tok_s",
    "pp_tok_s",
    "tput_x",
    "e2e_hop_ms",
    "hop_ms",
    "floor_hop_ms",
    "hop_vs_floor",
    "hidden_MiB",
    "logits_match",
]


def shape_config(shape: str) -> Any:
    """`REALISTIC_SHAPES[shape]`, or `tiny` (the Llama-3-8B shape scaled down: the CPU dry run)."""
    from engine.testmodel import REALISTIC_SHAPES

    if shape == "tiny":
        return dataclasses.replace(
            REALISTIC_SHAPES["llama3-8b"],
            vocab_size=512,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
        )
    return REALISTIC_SHAPES[shape]


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stage_seed(pp: int, rank: int) -> int:
    """The seed of stage `rank` of a PP `pp` split: the same in its process and in the
    in-process split, so both hold the same weights."""
    return SEED + 100 * pp + rank


def _stage_process(
    conn: Any, shape: str, pp: int, rank: int, device_name: str, max_tokens: int
) -> None:
    """Stage `rank` in its own process on `device_name` ("cuda:<k>", or "cpu" for the dry run):
    an inbox from the previous stage and, unless last, a sender to the next; one pipe message
    per step."""
    from cluster.hidden_channel import HiddenInbox, connect_sender
    from engine.layer_range import split_layers
    from transport.cuda_ipc.backend import CudaIpc

    device = torch.device(device_name)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    channel = "ipc" if cuda else "host"
    config = shape_config(shape)
    layers = split_layers(config.num_hidden_layers, pp)[rank]
    stage = random_stage(config, layers, stage_seed(pp, rank), device)
    cache = kv_cache(config, layers, max_tokens, device)
    backend = CudaIpc() if cuda else None
    inbox = HiddenInbox(
        channel, device, torch.bfloat16, max_tokens, config.hidden_size, backend, None
    )
    sender = None
    metas: dict[int, Any] = {}
    sync(device)
    conn.send(inbox.offer())
    while True:
        cmd, *args = conn.recv()
        if cmd == "stop":
            if sender is not None:
                sender.close()
            conn.send(None)
            return
        if cmd == "inbox":
            inbox.connect(args[0])
            conn.send(inbox.link.path)
        elif cmd == "sender":
            sender = connect_sender(args[0], channel, device, backend, None)
            conn.send(sender.link)
        elif cmd == "meta":
            metas[args[0]] = metadata(args[0], device)
            sync(device)
            conn.send(None)
        elif cmd == "ping":
            conn.send(time.perf_counter())
        elif cmd == "sync":
            sync(device)
            conn.send(time.perf_counter())
        elif cmd == "step":  # answers once queued; the last stage's final step synchronizes
            tokens, handoff, finish = args
            out = stage(inbox.receive(handoff), metas[tokens], cache)
            if sender is not None:
                conn.send(sender.send(out))
            elif finish:
                sync(device)
                conn.send((time.perf_counter(), out.float().cpu()))
            else:
                conn.send(None)
        elif cmd == "handoff":  # the hop alone: read the states once, synchronize
            inbox.receive(args[0]).sum()
            sync(device)
            conn.send(time.perf_counter())
        elif cmd == "received":
            conn.send(dict(inbox.received))


class StageProcess:
    """Handle on one stage's process; every method is one round trip."""

    def __init__(self, shape: str, pp: int, rank: int, device: str, max_tokens: int) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(
            target=_stage_process, args=(child, shape, pp, rank, device, max_tokens), daemon=True
        )
        self.process.start()
        self.offer: Any = None

    def ready(self) -> None:
        """Wait for the stage to be built; its inbox's offer arrives then."""
        self.offer = self._answer("start", 600)

    def _answer(self, what: str, timeout_s: float = 300) -> Any:
        deadline = time.monotonic() + timeout_s
        while not self.conn.poll(0.5):
            if not self.process.is_alive():
                raise RuntimeError(f"stage process exited ({self.process.exitcode}) at {what}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"stage process did not answer {what}")
        return self.conn.recv()

    def call(self, *msg: Any) -> Any:
        self.conn.send(msg)
        return self._answer(msg[0])

    def close(self) -> None:
        try:
            if self.process.is_alive():
                self.call("stop")
        finally:
            self.process.join(30)
            if self.process.is_alive():
                self.process.kill()


class Pipeline:
    """PP `pp`: stage 0 here on `devices[0]`, stage k in a process on `devices[k]`, chained
    through the hidden-state channel (CUDA IPC; the host on the CPU dry run); `split` holds the
    same stages in this process (the reference)."""

    def __init__(self, shape: str, pp: int, devices: list[str], max_tokens: int) -> None:
        from cluster.hidden_channel import connect_sender
        from engine.layer_range import split_layers
        from transport.cuda_ipc.backend import CudaIpc

        self.pp = pp
        self.device = torch.device(devices[0])
        cuda = self.device.type == "cuda"
        self.channel = "ipc" if cuda else "host"
        config = shape_config(shape)
        ranges = split_layers(config.num_hidden_layers, pp)
        # The other stages build while this process draws its own.
        self.stages = [StageProcess(shape, pp, k, devices[k], max_tokens) for k in range(1, pp)]
        self.links: list[str] = []
        self.senders: list[Any] = []
        try:
            self.split = [
                random_stage(config, r, stage_seed(pp, k), self.device)
                for k, r in enumerate(ranges)
            ]
            self.split_kv = [kv_cache(config, r, max_tokens, self.device) for r in ranges]
            for stage in self.stages:
                stage.ready()
            backend = CudaIpc() if cuda else None
            first = connect_sender(self.stages[0].offer, self.channel, self.device, backend, None)
            self.senders.append(first)
            self._link(0, first.link)
            for k in range(1, pp - 1):
                self._link(k, self.stages[k - 1].call("sender", self.stages[k].offer))
        except BaseException:
            self.close()
            raise
        self.sender = first

    def _link(self, producer: int, link: Any) -> None:
        """Connect the consumer of `producer`'s link; on GPUs anything but CUDA IPC is a
        failed run (a fallback to the host would be measured as if it were the GPU path)."""
        if link.path != self.channel:
            raise RuntimeError(
                f"hidden states {producer}->{producer + 1} go by {link.path}: {link.why}"
            )
        self.stages[producer].call("inbox", link)
        self.links.append(f"{producer}->{producer + 1}: {link.path} ({link.why})")

    def prepare(self, tokens: int) -> None:
        for stage in self.stages:
            stage.call("meta", tokens)

    def run(self, ids: torch.Tensor, meta: Any, tokens: int, prompts: int) -> tuple[float, Any]:
        """`prompts` prompts of these ids through the stages, each its own step; seconds from a
        synchronized start to the last stage's synchronized end, and its last logits."""
        for stage in self.stages:
            stage.call("sync")
        sync(self.device)
        start = time.perf_counter()
        answer = None
        for i in range(prompts):
            handoff = self.sender.send(self.split[0](ids, meta, self.split_kv[0]))
            for k, stage in enumerate(self.stages):
                answer = stage.call("step", tokens, handoff, k == self.pp - 2 and i == prompts - 1)
                handoff = answer
        assert answer is not None
        end, logits = answer
        return end - start, logits

    def run_split(self, ids: torch.Tensor, meta: Any, prompts: int = 1) -> tuple[float, Any]:
        """The same stages one after another on this process's GPU."""
        sync(self.device)
        start = time.perf_counter()
        for _ in range(prompts):
            out = ids
            for stage, kv in zip(self.split, self.split_kv, strict=True):
                out = stage(out, meta, kv)
        sync(self.device)
        return time.perf_counter() - start, out

    def hop(self, hidden: torch.Tensor) -> float:
        """Stage 0's states into stage 1, read there once: seconds to stage 1's sync."""
        sync(self.device)
        start = time.perf_counter()
        end = self.stages[0].call("handoff", self.sender.send(hidden))
        return end - start

    def close(self) -> None:
        for sender in self.senders:
            sender.close()
        for stage in self.stages:
            stage.close()


def timed(fn: Callable[[], float], reps: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    return [fn() for _ in range(reps)]


class Prompt:
    """One prompt of `tokens` random ids on `device`, its metadata, and the whole model on that
    GPU (the one-stage baseline)."""

    def __init__(self, tokens: int, vocab: int, device: torch.device, whole: Any, kv: Any):
        gen = torch.Generator().manual_seed(tokens)
        self.tokens = tokens
        self.device = device
        self.ids = torch.randint(0, vocab, (tokens,), generator=gen).to(device)
        self.meta = metadata(tokens, device)
        self.whole, self.kv = whole, kv

    def one_stage(self, prompts: int = 1) -> float:
        """`prompts` prompts through the whole model in turn: seconds, synchronized."""
        sync(self.device)
        start = time.perf_counter()
        for _ in range(prompts):
            self.whole(self.ids, self.meta, self.kv)
        sync(self.device)
        return time.perf_counter() - start


def ttft(pipeline: Pipeline, prompt: Prompt, reps: int) -> dict[str, Any]:
    """Median ms of one prompt by the one stage, the split on one GPU and the pipeline,
    interleaved so drift hits each alike; whether the pipeline's logits match the split's."""
    ids, meta, tokens = prompt.ids, prompt.meta, prompt.tokens
    for _ in range(2):  # warm up every path (Triton compiles, cuBLAS picks kernels)
        prompt.one_stage(), pipeline.run_split(ids, meta), pipeline.run(ids, meta, tokens, 1)
    times: dict[str, list[float]] = {"one": [], "split": [], "pp": []}
    here = there = None
    for _ in range(reps):
        times["one"].append(prompt.one_stage())
        t, here = pipeline.run_split(ids, meta)
        times["split"].append(t)
        t, there = pipeline.run(ids, meta, tokens, 1)
        times["pp"].append(t)
    assert here is not None and there is not None
    here = here.float().cpu()
    med = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    return {
        "one_stage_ms": med["one"],
        "split_1gpu_ms": med["split"],
        "pp_ms": med["pp"],
        "ttft_x": med["pp"] / med["one"],
        "e2e_hop_ms": (med["pp"] - med["split"]) / (pipeline.pp - 1),
        "spread_pp_ms": 1e3 * (max(times["pp"]) - min(times["pp"])),
        "logits_match": torch.allclose(here, there, rtol=1e-2, atol=1e-2),
        "logits_max_abs_diff": (here - there).abs().max().item(),
    }


def throughput(pipeline: Pipeline, prompt: Prompt, batch: int, reps: int) -> dict[str, float]:
    """Prefill tokens/s of `batch` prompts back to back: one stage, and the pipeline."""
    one = [prompt.one_stage(batch) for _ in range(reps)]
    pp = [pipeline.run(prompt.ids, prompt.meta, prompt.tokens, batch)[0] for _ in range(reps)]
    tokens = batch * prompt.tokens
    one_tok_s, pp_tok_s = tokens / statistics.median(one), tokens / statistics.median(pp)
    return {"one_stage_tok_s": one_tok_s, "pp_tok_s": pp_tok_s, "tput_x": pp_tok_s / one_tok_s}


def hop(
    pipeline: Pipeline, tokens: int, hidden_size: int, peer: torch.device, reps: int
) -> dict[str, float]:
    """Stage 0 -> 1 alone through the channel, against the same copy and read within GPU 0,
    and the floor: one copy of the states to the next GPU plus half a pipe round trip."""
    device = pipeline.device
    hidden = torch.randn(tokens, hidden_size, device=device).to(torch.bfloat16)
    local = torch.empty_like(hidden)
    there = torch.empty_like(hidden, device=peer)

    def hop_here() -> float:
        sync(device)
        start = time.perf_counter()
        local.copy_(hidden)
        local.sum()
        sync(device)
        return time.perf_counter() - start

    def copy_to_peer() -> float:
        if device.type != "cuda":
            start = time.perf_counter()
            there.copy_(hidden)
            return time.perf_counter() - start
        begin, done = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        there.copy_(hidden)  # a cross-GPU copy_ runs on the source's stream: the events see it
        done.record()
        done.synchronize()
        return begin.elapsed_time(done) / 1e3

    here_s = statistics.median(timed(hop_here, reps))
    hop_s = statistics.median(timed(lambda: pipeline.hop(hidden), reps)) - here_s
    copy_s = statistics.median(timed(copy_to_peer, reps))
    rtt = []
    for _ in range(50):
        sent = time.perf_counter()
        pipeline.stages[0].call("ping")
        rtt.append(time.perf_counter() - sent)
    floor_s = copy_s + statistics.median(rtt) / 2
    return {
        "hop_ms": 1e3 * hop_s,
        "floor_hop_ms": 1e3 * floor_s,
        "hop_vs_floor": hop_s / floor_s,
        "hidden_copy_ms": 1e3 * copy_s,
        "handoff_here_ms": 1e3 * here_s,
        "pipe_rtt_ms": 1e3 * statistics.median(rtt),
        "hidden_MiB": tokens * hidden_size * 2 / 2**20,
    }


def main() -> None:
    from engine.layer_range import LayerRange
    from engine.testmodel import REALISTIC_SHAPES

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pp", default="2,4", help="PP sizes, comma-separated")
    parser.add_argument("--shape", default=None, choices=[*sorted(REALISTIC_SHAPES), "tiny"])
    parser.add_argument("--lengths", type=int, nargs="*", default=list(LENGTHS))
    parser.add_argument("--reps", type=int, default=10, help="TTFT repetitions")
    parser.add_argument("--batch", type=int, default=8, help="prompts per throughput run")
    parser.add_argument("--tput-reps", type=int, default=3, help="throughput repetitions")
    parser.add_argument("--hop-reps", type=int, default=30, help="hop-alone repetitions")
    parser.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default="cuda",
        help="cpu: a dry run of the processes and pipes (hidden states by the host, `tiny`)",
    )
    add_same_gpu_flag(parser)
    args = parser.parse_args()
    sizes = [int(p) for p in args.pp.split(",") if p]
    if any(p < 2 for p in sizes):
        parser.error("PP sizes start at 2 (one stage is the baseline every row has)")
    cuda = args.device == "cuda"
    if args.same_gpu and not cuda:
        parser.error("--same-gpu maps GPUs onto cuda:0; it needs --device cuda")
    args.shape = args.shape or ("llama3-8b" if cuda else "tiny")
    multicast_off()
    extra: dict[str, Any]
    if cuda:
        gpus = logical_gpus(max(sizes), args.same_gpu, FIGURE)
        same_gpu_banner(args.same_gpu)
        devices = [f"cuda:{g}" for g in gpus]
        torch.cuda.set_device(devices[0])
        extra = topology(gpus, args.same_gpu)
    else:
        devices = ["cpu"] * max(sizes)
        extra = {"same_gpu": False, "cpu_dry_run": True}
    device = torch.device(devices[0])
    config = shape_config(args.shape)
    max_tokens = max(args.lengths)
    everything = LayerRange(0, config.num_hidden_layers)
    whole = random_stage(config, everything, SEED + 1, device)
    kv_whole = kv_cache(config, everything, max_tokens, device)
    peer = torch.device(devices[1])  # where the hop's floor copies to
    rows: list[dict[str, Any]] = []
    links: dict[int, list[str]] = {}
    received: dict[int, dict[str, int]] = {}
    for pp in sizes:
        build = time.perf_counter()
        pipeline = Pipeline(args.shape, pp, devices[:pp], max_tokens)
        log = f"PP {pp} built in {time.perf_counter() - build:.1f}s: {pipeline.links}"
        print(log, file=sys.stderr, flush=True)
        try:
            for tokens in args.lengths:
                pipeline.prepare(tokens)
                prompt = Prompt(tokens, config.vocab_size, device, whole, kv_whole)
                row: dict[str, Any] = {"pp": pp, "tokens": tokens, "same_gpu": args.same_gpu}
                row |= ttft(pipeline, prompt, args.reps)
                row |= throughput(pipeline, prompt, args.batch, args.tput_reps)
                row |= hop(pipeline, tokens, config.hidden_size, peer, args.hop_reps)
                rows.append(row)
                print(row, file=sys.stderr, flush=True)
            links[pp] = pipeline.links
            received[pp] = pipeline.stages[-1].call("received")
        finally:
            pipeline.close()
            del pipeline
            if cuda:
                torch.cuda.empty_cache()
    write_report(
        FIGURE,
        rows,
        COLUMNS,
        {
            **extra,
            "devices": devices,
            "shape": args.shape,
            "config": {k: str(v) for k, v in config.__dict__.items()},
            "hidden_links": links,
            "last_stage_handoffs_received": received,
            "reps": args.reps,
            "batch": args.batch,
            "tput_reps": args.tput_reps,
        },
    )
    if not all(r["logits_match"] for r in rows):
        sys.exit("the last stage's logits differ from the in-process split's")


if __name__ == "__main__":
    main()
