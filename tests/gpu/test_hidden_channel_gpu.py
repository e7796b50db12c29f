"""The hidden-state channel's CUDA IPC path on a real GPU (cluster/hidden_channel.py).

Skipped without CUDA (CI has none; tests/cluster/test_hidden_channel.py covers the decisions
and bytes on the CPU). Two checks:

- two processes that did not fork (the consumer is spawned), one GPU: every step's hidden
  states arrive byte-exact through the consumer's slots, which alternate, with neither side
  waiting on the host; the first step is queued behind seconds' worth of GPU sleep on each side,
  so a missing "produced" or "consumed" event would show as wrong bytes;
- a PP=2 `StageGroup` on one GPU (two Ray actors, half a GPU each, the generated test model):
  the first tokens with the IPC path equal those through the host. Needs Ray (skipped without).
"""

from __future__ import annotations

import multiprocessing as mp
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ROWS, HIDDEN = 256, 576
STEPS = [(37, 0), (256, 1), (1, 2), (100, 3), (64, 4), (255, 5)]  # (tokens, seed) per step
SLEEP_CYCLES = 2_000_000_000  # ~1 s of GPU time on an H100


def _states(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(n, HIDDEN, generator=g, device="cuda").to(torch.bfloat16)


def _consumer(conn: Any, gpu: int = 0) -> None:
    """Stage k+1 in its own process on GPU `gpu`: offers its slots, then reads one handoff per
    message."""
    from cluster.hidden_channel import HiddenInbox
    from transport.cuda_ipc.backend import CudaIpc

    device = torch.device("cuda", gpu)
    torch.cuda.set_device(device)
    inbox = HiddenInbox("ipc", device, torch.bfloat16, ROWS, HIDDEN, CudaIpc(), None)
    conn.send(inbox.offer())
    inbox.connect(conn.recv())
    got = []
    while (handoff := conn.recv()) is not None:
        if not got:  # the first read sits behind GPU work: the producer must not overwrite it
            torch.cuda._sleep(SLEEP_CYCLES)
        got.append((handoff.slot, inbox.receive(handoff)))
        conn.send("done")  # the step "returned": no host wait on the GPU
    torch.cuda.synchronize()
    # Plain bytes: a CPU tensor would travel as a shared fd, gone once this process exits.
    conn.send([(slot, t.view(torch.uint8).cpu().numpy().tobytes()) for slot, t in got])


def exchange_over_ipc(producer: int, consumer: int) -> None:
    """Every step of `STEPS` from this process on GPU `producer` into a spawned consumer on GPU
    `consumer` (the same or a peer GPU): byte-exact, in alternating slots, with no host waits."""
    from cluster.hidden_channel import IpcSender, connect_sender
    from transport.cuda_ipc.backend import CudaIpc

    ctx = mp.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    child = ctx.Process(target=_consumer, args=(child_conn, consumer), daemon=True)
    child.start()
    device = torch.device("cuda", producer)
    with torch.cuda.device(device):  # `_states` draws on the current GPU
        try:
            sender = connect_sender(conn.recv(), "ipc", device, CudaIpc(), None)
            assert isinstance(sender, IpcSender), sender.link.why
            conn.send(sender.link)
            sent = []
            for step, (n, seed) in enumerate(STEPS):
                if step == 0:  # the first write sits behind GPU work: the consumer must wait for it
                    torch.cuda._sleep(SLEEP_CYCLES)
                hidden = _states(n, seed)
                sent.append(hidden.cpu() if step else None)  # (.cpu() would wait for the sleep)
                conn.send(sender.send(hidden))
                assert conn.recv() == "done"
            conn.send(None)
            assert conn.poll(120), "the consumer never answered"
            got = conn.recv()
            sent[0] = _states(*STEPS[0]).cpu()
            assert [slot for slot, _ in got] == [i % 2 for i in range(len(STEPS))]
            for step, ((_, raw), want) in enumerate(zip(got, sent, strict=True)):
                assert raw == want.view(torch.uint8).numpy().tobytes(), step
            sender.close()
        finally:
            child.join(30)
            if child.is_alive():
                child.kill()


def test_ipc_between_two_processes_is_byte_exact_and_alternates_slots() -> None:
    exchange_over_ipc(0, 0)


# -- a PP=2 StageGroup on one GPU ------------------------------------------------------------------


def _first_tokens(
    model_dir: Any, hidden_channel: str, prompts: list[list[int]], num_gpus: float = 0.5
) -> Any:
    """Greedy first tokens of `prompts`, one step each, through a fresh PP=2 group (requests
    never admitted: the stages compute and sample but send no KV). `num_gpus` per stage: half
    of this one GPU, or (1) a GPU each on a multi-GPU machine."""
    import asyncio

    from cluster.messages import ChunkPlan, StepPlan
    from cluster.stage_actor import StageSpec
    from cluster.stage_group import Placement, StageGroup
    from engine import EngineConfig, SamplingParams
    from engine.config import ModelConfig
    from engine.layer_range import split_layers
    from transport import TransportConfig

    engine = EngineConfig(model=str(model_dir), device="auto", page_size=16, num_pages=64)
    transport = TransportConfig(hostname="127.0.0.1", hidden_channel=hidden_channel)
    layers = split_layers(ModelConfig.from_dir(model_dir).num_hidden_layers, 2)
    specs = [
        StageSpec(engine, r.start, r.end, i, 2, transport=transport, max_batched_tokens=256)
        for i, r in enumerate(layers)
    ]
    placement = Placement("PACK", num_gpus=num_gpus, num_cpus=0.5)
    group = StageGroup(specs, placement, f"hc{hidden_channel}")

    async def run() -> Any:
        await group.start()
        paths = [link.path for link in group.hidden_links]
        tokens = []
        try:
            for step, prompt in enumerate(prompts):
                pages = list(range(-(-len(prompt) // 16)))
                chunk = ChunkPlan(
                    f"r{step}", 0, prompt, pages, True, room=step, sampling=SamplingParams(0)
                )
                reports = await group.step(StepPlan(step, None, batch=(chunk,)))
                tokens.append(reports[-1].first_tokens[f"r{step}"].token_id)
            received = (await group.call_one(1, "stats"))["hidden_received"]
        finally:
            await group.shutdown()
        return paths, tokens, received

    return asyncio.run(run())


def test_pp2_stage_group_on_one_gpu_samples_the_same_first_tokens_over_ipc(llama_dir) -> None:
    ray = pytest.importorskip("ray", reason="the PP=2 group needs Ray on this machine")
    prompts = [[5 + (7 * i + 3 * j) % 500 for j in range(n)] for i, n in enumerate([5, 40, 200])]
    ray.init(address="local", num_cpus=4, num_gpus=1, log_to_driver=False)
    try:
        host_paths, host, via_host = _first_tokens(llama_dir, "host", prompts)
        ipc_paths, ipc, via_ipc = _first_tokens(llama_dir, "auto", prompts)
    finally:
        ray.shutdown()
    assert host_paths == ["host"] and ipc_paths == ["ipc"]
    # Every step's states went the chosen way (none fell back to the host for not fitting).
    assert via_host == {"host": len(prompts)} and via_ipc == {"ipc": len(prompts)}
    assert ipc == host
