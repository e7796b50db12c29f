"""Prefill and decode on different GPUs of one host (issue #25), byte for byte.

Skipped, with the reason, where the machine has fewer GPUs than a test needs (CI has none, a lent
`nvidia-h100-x1` one): 2 for the KV fast path and the hidden-state channel, 4 for the service.
Built from the one-GPU tests' pieces (test_fast_path_gpu.py, test_hidden_channel_gpu.py,
test_service_gpu.py) with the sides on different GPUs:

- KV over the CUDA IPC fast path from a stage on one GPU into a decode cache on another (peer
  access: no page route, one copy per run on the copy engines), both directions, behind compute,
  a PP=2 request with a stage on each GPU, and the same with the fast path off (Mooncake);
- hidden states from a process on one GPU into a consumer process on the other, and a PP=2
  `StageGroup` with a stage per GPU whose first tokens over IPC equal the host path's;
- the whole service with PD's two stages and its decode replica each on a GPU of its own: greedy
  PD == colocated through the HTTP API, KV and hidden states by CUDA IPC across GPUs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import torch

from benchmarks.gpu.multi_gpu import machine_kind


def _needs(n: int) -> pytest.MarkDecorator:
    """Skip, saying why, where fewer than `n` GPUs are visible (never a silent pass)."""
    return pytest.mark.skipif(
        torch.cuda.device_count() < n,
        reason=f"needs {n} CUDA GPUs of one host ({machine_kind(n)} or larger); "
        f"this machine has {torch.cuda.device_count()}",
    )


pytestmark = _needs(2)

from tests.gpu.test_fast_path_gpu import (  # noqa: E402
    LOOPBACK,
    SHAPE,
    TOKEN,
    GpuStage,
    assert_arrived,
)
from tests.gpu.test_hidden_channel_gpu import _first_tokens, exchange_over_ipc  # noqa: E402
from tests.gpu.test_service_gpu import assert_same_greedy_answers, pd_and_colocated  # noqa: E402
from tests.transport.peer import DecodePeer, PrefillStage, page_checksums  # noqa: E402
from tests.transport.test_transfer import assert_pages_arrived, transfer, wait_done  # noqa: E402
from transport import KVPoll, KVSender, TransportConfig  # noqa: E402
from transport.cuda_ipc.mover import CudaIpcMover  # noqa: E402

SERVICE_PROMPTS = ["The quick brown fox", "pdserve serves", "1 2 3 4 5 6 7 8", "What is 2+2?"]
SERVICE_MAX_TOKENS = 24


def uuid(index: int) -> str:
    return str(torch.cuda.get_device_properties(index).uuid)


@pytest.fixture(scope="module")
def peer_on_1() -> Iterator[DecodePeer]:
    p = DecodePeer(SHAPE, device="cuda:1", timeout_s=120)
    yield p
    p.stop()


@pytest.fixture(scope="module")
def stage_on_0() -> Iterator[GpuStage]:
    s = GpuStage(device="cuda:0")
    yield s
    s.close()


def assert_peer_copy(sender: KVSender) -> None:
    """The sender's mover is the fast path to a peer GPU: mapped, no same-GPU page route."""
    mover = sender.mover
    assert isinstance(mover, CudaIpcMover), getattr(mover, "why", mover)
    assert mover.route is None and not mover.mapping.same_device


# -- the KV fast path between GPUs ---------------------------------------------------------------


def test_a_decode_cache_on_gpu_1_offers_gpu_1_and_a_stage_on_gpu_0_can_see_it(
    peer_on_1: DecodePeer,
) -> None:
    info = peer_on_1.receive("offer", 1, [0, 1])
    assert info.cuda_ipc is not None
    assert info.cuda_ipc.device_uuid == uuid(1) != uuid(0)
    assert torch.cuda.can_device_access_peer(0, 1), "GPU 0 cannot reach GPU 1's memory"


def test_kv_moves_from_gpu_0_to_gpu_1_by_cuda_ipc_byte_exact_with_the_first_token(
    stage_on_0: GpuStage, peer_on_1: DecodePeer
) -> None:
    peer_on_1.reset()
    local, remote = [*range(3, 13), 40, 2, 50], [*range(20, 30), 7, 60, 1]
    sender, (state, reason, first) = stage_on_0.send(peer_on_1, local, remote)
    assert sender.stats.mover == "cuda_ipc", sender.mover
    assert_peer_copy(sender)
    assert sender.poll() is KVPoll.Success, sender.failure_reason
    assert KVPoll(state) is KVPoll.Success, reason
    assert first == TOKEN
    assert_arrived(stage_on_0, peer_on_1, local, remote)
    assert stage_on_0.endpoint.metadata.num_held == 0


def test_kv_moves_from_gpu_1_to_gpu_0_by_cuda_ipc_byte_exact() -> None:
    peer = DecodePeer(SHAPE, device="cuda:0", timeout_s=120)
    stage = GpuStage(device="cuda:1")
    try:
        local, remote = [0, 1, 2, 9, 33], [5, 6, 7, 40, 41]
        sender, (state, reason, first) = stage.send(peer, local, remote)
        assert sender.stats.mover == "cuda_ipc" and KVPoll(state) is KVPoll.Success, reason
        assert_peer_copy(sender)
        assert first == TOKEN
        assert_arrived(stage, peer, local, remote)
    finally:
        stage.close()
        peer.stop()


def test_the_peer_copy_waits_for_kv_still_being_computed_on_gpu_0(
    stage_on_0: GpuStage, peer_on_1: DecodePeer
) -> None:
    """KV queued on GPU 0's stream right before `send` is what lands on GPU 1, not older bytes."""
    peer_on_1.reset()
    local, remote = list(range(0, 16)), list(range(16, 32))
    with torch.cuda.device(0):
        sender = stage_on_0.toward(peer_on_1, remote)
        torch.cuda._sleep(100_000_000)  # ~50 ms of GPU time ahead of the writes below
        for i, layer in enumerate(stage_on_0.cache.layers):
            layer[:, local[0] : local[-1] + 1].fill_(float(i + 1))
        sender.send(local, TOKEN)
        assert sender.poll() is KVPoll.Transferring
        state = wait_done(sender, timeout=30)
    state, reason, _ = peer_on_1.settle(sender.rid, state is KVPoll.Success, sender.failure_reason)
    assert sender.stats.mover == "cuda_ipc" and KVPoll(state) is KVPoll.Success, reason
    assert_peer_copy(sender)
    assert torch.equal(peer_on_1.checksums(remote), page_checksums(stage_on_0.cache.layers, local))
    assert_arrived(stage_on_0, peer_on_1, local, remote)


def test_a_pp2_request_with_a_stage_on_each_gpu_lands_byte_exact(peer_on_1: DecodePeer) -> None:
    """Stage 0 on GPU 0 reaches decode's GPU 1 as a peer; stage 1, on GPU 1 itself, by the page
    route. Both halves of every page land, and decode sees the request done with its token."""
    peer_on_1.reset()
    config = TransportConfig(hostname=LOOPBACK)
    stages = [
        PrefillStage(SHAPE, config, range(0, 2), device="cuda:0"),
        PrefillStage(SHAPE, config, range(2, 4), device="cuda:1"),
    ]
    try:
        local, remote = [*range(4, 12), 30], [*range(40, 48), 2]
        senders = transfer(stages, peer_on_1, "pp2", TOKEN.room, [local, local], remote, TOKEN)
        for sender in senders:
            assert sender.poll() is KVPoll.Success, sender.failure_reason
            assert sender.stats.mover == "cuda_ipc", sender.mover
        assert_peer_copy(senders[0])
        last = senders[1].mover
        assert isinstance(last, CudaIpcMover) and last.mapping.same_device, last
        state, reason, first = peer_on_1.poll("pp2")
        assert KVPoll(state) is KVPoll.Success and first == TOKEN, reason
        assert_pages_arrived(stages, peer_on_1, [([local, local], remote)])
    finally:
        for stage in stages:
            stage.close()


def test_with_the_fast_path_off_kv_moves_from_gpu_0_to_gpu_1_by_mooncake(
    peer_on_1: DecodePeer,
) -> None:
    peer_on_1.reset()
    off = GpuStage(TransportConfig(hostname=LOOPBACK, cuda_ipc=False), device="cuda:0")
    try:
        local, remote = [0, 1, 2, 9], [4, 5, 6, 33]
        sender, (state, reason, _) = off.send(peer_on_1, local, remote)
        assert sender.stats.mover == "mooncake" and KVPoll(state) is KVPoll.Success, reason
        assert_arrived(off, peer_on_1, local, remote)
    finally:
        off.close()


# -- hidden states between GPUs ------------------------------------------------------------------


@pytest.mark.parametrize(("producer", "consumer"), [(0, 1), (1, 0)])
def test_hidden_states_cross_gpus_byte_exact_in_alternating_slots(
    producer: int, consumer: int
) -> None:
    exchange_over_ipc(producer, consumer)


def test_pp2_stage_group_with_a_stage_per_gpu_samples_the_same_first_tokens_over_ipc(
    llama_dir,
) -> None:
    ray = pytest.importorskip("ray", reason="the PP=2 group needs Ray on this machine")
    from benchmarks.gpu.service_bench import engine_gpus, log_lines

    prompts = [[5 + (7 * i + 3 * j) % 500 for j in range(n)] for i, n in enumerate([5, 40, 200])]
    ray.init(address="local", num_cpus=4, num_gpus=2, log_to_driver=False)
    try:
        host_paths, host, via_host = _first_tokens(llama_dir, "host", prompts, num_gpus=1)
        ipc_paths, ipc, via_ipc = _first_tokens(llama_dir, "auto", prompts, num_gpus=1)
        driven = engine_gpus(log_lines("actor drives cuda:"))
    finally:
        ray.shutdown()
    assert host_paths == ["host"] and ipc_paths == ["ipc"]
    assert via_host == {"host": len(prompts)} and via_ipc == {"ipc": len(prompts)}
    assert ipc == host
    # Two groups of two stage actors, each on a GPU of its own.
    assert len(driven) == 4 and all(len(ids) == 1 for ids in driven), driven
    assert {ids[0] for ids in driven} == {"0", "1"}, driven


# -- the whole service, a GPU per engine process -------------------------------------------------


@pytest.fixture(scope="module")
def service(llama_dir) -> Iterator[dict[str, object]]:
    """PD (2 stages + decode) and colocated side by side, each engine process on a GPU of its
    own (4 GPUs); what the engine processes logged about their GPUs, once all are up."""
    from benchmarks.gpu.multi_gpu import multicast_off
    from benchmarks.gpu.service_bench import engine_gpus, log_lines

    multicast_off()
    with pd_and_colocated(llama_dir, 4, 1, "multi") as urls:
        yield {**urls, "engine_gpus": engine_gpus(log_lines("actor drives cuda:"))}


@_needs(4)
def test_pd_with_stages_and_decode_on_their_own_gpus_answers_colocated_greedy_tokens(
    service,
) -> None:
    driven = service["engine_gpus"]
    assert isinstance(driven, list)
    assert sorted(ids[0] for ids in driven) == ["0", "1", "2", "3"], driven
    urls = {mode: str(service[mode]) for mode in ("pd", "colocated")}
    assert_same_greedy_answers(urls, SERVICE_PROMPTS, SERVICE_MAX_TOKENS)


@_needs(4)
def test_across_gpus_the_service_moves_kv_and_hidden_states_by_cuda_ipc(service) -> None:
    """The stages logged the fast path to the decode replica's GPU (no Mooncake fallback) and
    hidden states from stage 0 over IPC (none through the host)."""
    from benchmarks.gpu.service_bench import kv_path, log_lines, timed_request

    asyncio.run(timed_request(service["pd"], "alpha beta gamma", 2))
    path = kv_path()
    assert path["cuda_ipc"] >= 1 and path["fallback_to_mooncake"] == 0, path
    assert log_lines("hidden states from the previous stage: ipc"), "no IPC hidden channel"
    assert not log_lines("hidden states go through the host")
