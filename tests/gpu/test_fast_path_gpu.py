"""The same-node fast path on a real GPU: CUDA IPC between two processes that did not fork.

Skipped without CUDA (CI has none). The decode side is a spawned process with its KV cache on
the GPU (tests/transport/peer.py with `device="cuda"`); the prefill stage is this process.
Everything is the real code, Mooncake included (tcp on loopback, for the first-token record and
the fallback).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from tests.transport.peer import (  # noqa: E402
    FILL,
    CacheShape,
    DecodePeer,
    PrefillStage,
    page_checksums,
)
from tests.transport.test_fast_path import mapping_users  # noqa: E402
from tests.transport.test_transfer import wait_done  # noqa: E402
from transport import (  # noqa: E402
    FirstToken,
    KVPoll,
    KVSender,
    TransportConfig,
)
from transport.cuda_ipc import backend as ipc_backend  # noqa: E402
from transport.cuda_ipc.backend import CudaIpc  # noqa: E402
from transport.cuda_ipc.driver import node_id  # noqa: E402
from transport.cuda_ipc.mover import CudaIpcMover  # noqa: E402
from transport.cuda_ipc.staging import _Staging  # noqa: E402
from transport.endpoint import MooncakeMover  # noqa: E402
from transport.streams import after_sends, behind_current_stream  # noqa: E402

SHAPE = CacheShape(
    num_layers=4, num_pages=64, page_size=16, num_kv_heads=2, head_dim=128, dtype="bfloat16"
)
LOOPBACK = "127.0.0.1"  # no Ray on the GPU machine to resolve "auto"
TOKEN = FirstToken(room=11, token_id=42, logprob=-0.5, num_prompt_tokens=100)


class GpuStage(PrefillStage):
    """A prefill stage holding every layer on the GPU (`device`: "cuda" is GPU 0), sending
    toward the decode peer."""

    def __init__(self, config: TransportConfig | None = None, device: str = "cuda") -> None:
        super().__init__(SHAPE, config or TransportConfig(hostname=LOOPBACK), device=device)
        self._n = 0

    def toward(self, peer: DecodePeer, remote: list[int], last: bool = True) -> KVSender:
        """A last-stage sender (unless `last` is False) toward `remote`, waiting for input."""
        self._n += 1
        return self.sender_to(peer, f"g{self._n}", TOKEN.room, remote, is_last=last)

    def send(
        self,
        peer: DecodePeer,
        local: list[int],
        remote: list[int],
        before_send=None,
        general: bool = False,
    ) -> tuple[KVSender, tuple]:
        sender = self.toward(peer, remote)
        if general:  # no route: the general path (segments, side stream, from the pool)
            assert isinstance(sender.mover, CudaIpcMover)
            sender.mover.route = None
        if before_send is not None:
            before_send()
        sender.send(local, TOKEN)
        state = wait_done(sender, timeout=30)
        return sender, peer.settle(sender.rid, state is KVPoll.Success, sender.failure_reason)


@pytest.fixture(scope="module")
def peer() -> Iterator[DecodePeer]:
    p = DecodePeer(SHAPE, device="cuda", timeout_s=120)
    yield p
    p.stop()


@pytest.fixture(scope="module")
def stage() -> Iterator[GpuStage]:
    s = GpuStage()
    yield s
    s.close()


def assert_arrived(stage: GpuStage, peer: DecodePeer, local: list[int], remote: list[int]):
    got = peer.layers()
    for src, dst in zip(stage.cache.layers, got, strict=True):
        s = src.view(torch.uint8).cpu()
        for lp, rp in zip(local, remote, strict=True):
            assert torch.equal(dst[:, rp], s[:, lp]), (lp, rp)
        untouched = [p for p in range(SHAPE.num_pages) if p not in remote]
        assert bool((dst[:, untouched] == FILL).all())


def test_receiver_info_offers_this_node_and_the_decode_gpu(peer: DecodePeer) -> None:
    info = peer.receive("offer", 1, [0, 1])
    assert info.cuda_ipc is not None
    assert info.cuda_ipc.node_id == node_id()
    assert info.cuda_ipc.device_uuid == str(torch.cuda.get_device_properties(0).uuid)
    for layer in info.layers:  # every layer lies inside an exported allocation
        assert any(
            a.base <= layer.base and layer.base + layer.nbytes <= a.base + a.nbytes
            for a in info.cuda_ipc.allocations
        )


def test_kv_moves_by_cuda_ipc_byte_exact_with_the_first_token(
    stage: GpuStage, peer: DecodePeer
) -> None:
    peer.reset()
    local, remote = [*range(3, 13), 40, 2, 50], [*range(20, 30), 7, 60, 1]
    sender, (state, reason, first) = stage.send(peer, local, remote)
    assert sender.mover is not None and sender.mover.name == "cuda_ipc", sender.mover.why
    assert isinstance(sender.mover, CudaIpcMover) and sender.mover.route is not None
    assert sender.poll() is KVPoll.Success, sender.failure_reason
    assert KVPoll(state) is KVPoll.Success, reason
    assert first == TOKEN
    assert sender.stats.segments == SHAPE.num_layers * 2 * 4 + 1  # 4 runs, + the record
    assert_arrived(stage, peer, local, remote)
    assert stage.endpoint.metadata.num_held == 0
    assert stage.endpoint.cuda_ipc is not None
    assert stage.endpoint.cuda_ipc.mapped_sessions == {peer.session_id}
    assert isinstance(stage.endpoint.cuda_ipc.backend, CudaIpc)
    assert stage.endpoint.cuda_ipc.backend.kernel_in_use  # one launch, not a memcpy per run
    assert stage.endpoint.cuda_ipc.backend.graphs_in_use  # and a graph replay, not a launch


def test_requests_of_more_runs_than_the_graph_takes_launch_the_kernel(
    stage: GpuStage, peer: DecodePeer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ipc_backend, "_GRAPH_RUNS", 2)  # so 4 runs take the per-request launch
    peer.reset()
    local, remote = [*range(3, 13), 40, 2, 50], [*range(20, 30), 7, 60, 1]
    sender, (state, reason, first) = stage.send(peer, local, remote)
    assert sender.stats.mover == "cuda_ipc" and KVPoll(state) is KVPoll.Success, reason
    assert first == TOKEN
    assert_arrived(stage, peer, local, remote)


def test_the_copy_waits_for_kv_still_being_computed_on_the_stage_stream(
    stage: GpuStage, peer: DecodePeer
) -> None:
    """KV queued on the current stream right before `send` is what arrives, not older bytes."""
    peer.reset()
    local, remote = list(range(0, 16)), list(range(16, 32))

    def compute_late() -> None:
        torch.cuda._sleep(100_000_000)  # ~50 ms of GPU time ahead of the writes below
        for i, layer in enumerate(stage.cache.layers):
            layer[:, local[0] : local[-1] + 1].fill_(float(i + 1))  # a view, in place

    sender = stage.toward(peer, remote)
    compute_late()
    sender.send(local, TOKEN)
    # The copy sits behind ~50 ms of GPU work: no Success (and the pages stay held) until then.
    assert sender.poll() is KVPoll.Transferring and sender.in_flight
    state = wait_done(sender, timeout=30)
    state, reason, _ = peer.settle(sender.rid, state is KVPoll.Success, sender.failure_reason)
    assert sender.stats.mover == "cuda_ipc" and KVPoll(state) is KVPoll.Success, reason
    assert not sender.in_flight
    assert torch.equal(peer.checksums(remote), page_checksums(stage.cache.layers, local))
    assert_arrived(stage, peer, local, remote)


def test_in_the_stage_order_the_copy_follows_the_forward_and_the_host_copy_does_not_wait(
    stage: GpuStage, peer: DecodePeer
) -> None:
    """The stage actor's order: forward queued, `send` on a side stream behind it
    (`behind_current_stream`), then the hidden states to the host, then the sampled token.
    What arrives is the forward's KV; the hidden states' copy does not wait for the KV copy."""
    peer.reset()
    local, remote = list(range(0, 16)), list(range(16, 32))
    sender = stage.toward(peer, remote)
    hidden = torch.empty(1 << 20, device="cuda")
    torch.cuda._sleep(100_000_000)  # the forward: ~50 ms of GPU time, then its KV
    for i, layer in enumerate(stage.cache.layers):
        layer[:, local[0] : local[-1] + 1].fill_(float(i + 3))
    hidden.fill_(7.0)
    compute = torch.cuda.current_stream()
    with behind_current_stream(torch.device("cuda")):
        side = torch.cuda.current_stream()
        assert side != compute
        sender.send(local)
        torch.cuda._sleep(400_000_000)  # more work on the side stream: ~200 ms
        side_done = side.record_event()
    assert torch.cuda.current_stream() == compute
    assert bool((hidden.cpu() == 7.0).all())  # waited for the forward only
    assert not side_done.query()  # the side stream is still busy
    sender.send_first_token(TOKEN)
    state = wait_done(sender, timeout=30)
    state, reason, first = peer.settle(sender.rid, state is KVPoll.Success, sender.failure_reason)
    assert sender.stats.mover == "cuda_ipc" and KVPoll(state) is KVPoll.Success, reason
    assert first == TOKEN
    assert torch.equal(peer.checksums(remote), page_checksums(stage.cache.layers, local))
    assert_arrived(stage, peer, local, remote)
    side_done.synchronize()


def test_the_next_forward_writes_a_failed_requests_pages_only_after_its_copy_read_them(
    stage: GpuStage, peer: DecodePeer
) -> None:
    """A request fails with its copy still queued on the side stream, and the controller gives
    its pages to the next forward at once. That forward starts behind the queued sends
    (`after_sends`, as the stage actor calls it), so the copy reads the bytes it was sent for."""
    peer.reset()
    local, remote = list(range(0, 16)), list(range(16, 32))
    sender = stage.toward(peer, remote, last=False)
    for i, layer in enumerate(stage.cache.layers):
        layer[:, local[0] : local[-1] + 1].fill_(float(i + 3))
    sent = page_checksums(stage.cache.layers, local)
    cuda = torch.device("cuda")
    with behind_current_stream(cuda):
        torch.cuda._sleep(200_000_000)  # a busy side stream: the copy starts ~100 ms from now
        sender.send(local)
    sender.abort("failed by consensus")  # its pages are free for the next forward now
    after_sends(cuda)
    for layer in stage.cache.layers:  # the next forward writes them
        layer[:, local[0] : local[-1] + 1].fill_(-1.0)
    torch.cuda.synchronize()
    assert torch.equal(peer.checksums(remote), sent)
    deadline = time.monotonic() + 15
    while sender.in_flight:
        assert time.monotonic() < deadline, "the aborted copy was never released"
        time.sleep(0.005)
    peer.settle(sender.rid, False, "failed by consensus")


def test_more_requests_behind_compute_than_staging_slots_each_arrive_byte_exact(
    stage: GpuStage, peer: DecodePeer
) -> None:
    """20 copies queued behind ~20 ms of GPU work, 16 staging slots: the 17th `send` waits for
    the oldest slot's copy, and no request's run table is overwritten under its copy."""
    peer.reset()
    count = _Staging.SLOTS + 4
    plans = [([i, i + 1, 40 + i], [2 * i, 2 * i + 1, 63 - i]) for i in range(count)]
    senders = [stage.toward(peer, remote, last=False) for _, remote in plans]
    torch.cuda._sleep(40_000_000)
    for sender, (local, _) in zip(senders, plans, strict=True):
        sender.send(local)
    for sender in senders:
        state = wait_done(sender, timeout=30)
        assert state is KVPoll.Success and sender.stats.mover == "cuda_ipc", sender.failure_reason
        peer.settle(sender.rid, True)
    remote = [p for _, r in plans for p in r]
    local = [p for lp, _ in plans for p in lp]
    assert torch.equal(peer.checksums(remote), page_checksums(stage.cache.layers, local))
    assert_arrived(stage, peer, local, remote)


def test_a_request_launches_without_uploading_its_run_table(
    stage: GpuStage, peer: DecodePeer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The copy reads the run table in place (mapped host memory): no memcpy per request."""
    backend = stage.endpoint.cuda_ipc.backend if stage.endpoint.cuda_ipc else None
    assert isinstance(backend, CudaIpc)

    def no_upload(*args: object) -> None:
        raise AssertionError("a run table was uploaded with cudaMemcpyAsync")

    monkeypatch.setattr(backend.runtime, "memcpy_async", no_upload)
    peer.reset()
    for local, remote in (
        ([0, 1, 2], [9, 10, 11]),
        ([*range(3, 13), 40, 2, 50], [*range(20, 30), 7, 60, 1]),
    ):
        sender, (state, reason, first) = stage.send(peer, local, remote)
        assert sender.stats.mover == "cuda_ipc" and KVPoll(state) is KVPoll.Success, reason
        assert first == TOKEN
    monkeypatch.setattr(ipc_backend, "_GRAPH_RUNS", 2)  # the direct launch reads it in place too
    peer.reset()
    sender, (state, reason, _) = stage.send(
        peer, [*range(3, 13), 40, 2, 50], [*range(20, 30), 7, 60, 1]
    )
    assert KVPoll(state) is KVPoll.Success, reason
    assert_arrived(stage, peer, [*range(3, 13), 40, 2, 50], [*range(20, 30), 7, 60, 1])


def test_the_general_path_still_copies_byte_exact(stage: GpuStage, peer: DecodePeer) -> None:
    """Without a route (strided pages, a peer GPU): segments, one launch from the pool."""
    peer.reset()
    local, remote = [*range(3, 13), 40, 2, 50], [*range(20, 30), 7, 60, 1]
    sender, (state, reason, first) = stage.send(peer, local, remote, general=True)
    assert sender.stats.mover == "cuda_ipc" and KVPoll(state) is KVPoll.Success, reason
    assert first == TOKEN
    assert_arrived(stage, peer, local, remote)


def test_abort_with_the_copy_behind_compute_holds_the_mapping_until_it_ran(
    stage: GpuStage, peer: DecodePeer
) -> None:
    peer.reset()
    sender = stage.toward(peer, [8, 9])
    path = stage.endpoint.cuda_ipc
    assert path is not None
    mapping = path._mappings[peer.session_id]
    torch.cuda._sleep(100_000_000)  # the copy queues behind ~50 ms of GPU work
    sender.send([0, 1], TOKEN)
    sender.abort()
    assert sender.poll() is KVPoll.Failed and sender.in_flight and mapping_users(mapping) == 1
    deadline = time.monotonic() + 15
    while sender.in_flight:
        assert time.monotonic() < deadline, "the aborted copy was never released"
        time.sleep(0.005)
    assert mapping_users(mapping) == 0 and stage.endpoint.metadata.num_held == 0
    peer.settle(sender.rid, False, "aborted")
    torch.cuda.synchronize()


def test_fast_path_off_moves_gpu_kv_by_mooncake(peer: DecodePeer) -> None:
    peer.reset()
    off = GpuStage(TransportConfig(hostname=LOOPBACK, cuda_ipc=False))
    try:
        local, remote = [0, 1, 2, 9], [4, 5, 6, 33]
        sender, (state, reason, _) = off.send(peer, local, remote)
        assert sender.stats.mover == "mooncake" and KVPoll(state) is KVPoll.Success, reason
        assert_arrived(off, peer, local, remote)
    finally:
        off.close()


@pytest.mark.parametrize("last", [False, True])
def test_over_mooncake_a_send_before_the_forward_ran_reads_the_forward_kv(
    peer: DecodePeer, last: bool
) -> None:
    """The stage's order with the fast path off: `send` right after the forward is queued,
    on the side stream. Mooncake reads the GPU pages only once the stream passed the KV."""
    peer.reset()
    off = GpuStage(TransportConfig(hostname=LOOPBACK, cuda_ipc=False))
    try:
        local, remote = list(range(0, 8)), list(range(24, 32))
        sender = off.toward(peer, remote, last=last)
        assert isinstance(sender.mover, MooncakeMover)
        assert sender.mover.device == torch.device("cuda", 0)  # so `send` takes a stream ticket
        torch.cuda._sleep(100_000_000)  # the forward: ~50 ms of GPU time, then its KV
        for i, layer in enumerate(off.cache.layers):
            layer[:, local[0] : local[-1] + 1].fill_(float(i + 5))
        with behind_current_stream(torch.device("cuda")):
            sender.send(local)
        if last:
            sender.send_first_token(TOKEN)
        assert wait_done(sender, timeout=30) is KVPoll.Success, sender.failure_reason
        state, reason, first = peer.settle(sender.rid, True)
        if last:  # a middle stage writes no record, so its receiver alone cannot succeed
            assert KVPoll(state) is KVPoll.Success and first == TOKEN, reason
        assert torch.equal(peer.checksums(remote), page_checksums(off.cache.layers, local))
        assert_arrived(off, peer, local, remote)
    finally:
        off.close()


def test_mappings_close_when_the_decode_process_goes_away() -> None:
    peer = DecodePeer(SHAPE, device="cuda", timeout_s=120)
    stage = GpuStage(TransportConfig(hostname=LOOPBACK, liveness_interval_s=0.2))
    try:
        sender, (state, reason, _) = stage.send(peer, [0, 1], [2, 3])
        assert sender.stats.mover == "cuda_ipc" and KVPoll(state) is KVPoll.Success, reason
        path = stage.endpoint.cuda_ipc
        assert path is not None and path.mapped_sessions == {peer.session_id}
        peer.kill()
        deadline = time.monotonic() + 15
        while path.mapped_sessions:
            assert time.monotonic() < deadline, "mapping of a dead peer still open"
            time.sleep(0.05)
        assert not stage.endpoint.liveness.watched
        torch.cuda.synchronize()
    finally:
        stage.close()
        peer.stop()


def test_a_handle_that_does_not_open_falls_back_to_mooncake(peer: DecodePeer) -> None:
    peer.reset()
    fresh = GpuStage()  # its own endpoint, so the good mapping of `stage` is not reused
    try:
        info = peer.receive("bad-handle", TOKEN.room, [5, 6])
        assert info.cuda_ipc is not None
        zeroed = tuple(
            a.model_copy(update={"handle": "00" * 64}) for a in info.cuda_ipc.allocations
        )
        sender = KVSender(
            fresh.endpoint,
            rid="bad-handle",
            room=TOKEN.room,
            regions=fresh.cache.regions(),
            layout=SHAPE.layout(),
            is_last_stage=True,
        )
        sender.set_receiver_info(
            info.model_copy(
                update={"cuda_ipc": info.cuda_ipc.model_copy(update={"allocations": zeroed})}
            )
        )
        assert sender.mover is not None and sender.mover.name == "mooncake"
        assert "CUDA IPC open failed" in sender.mover.why
        sender.send([1, 2], TOKEN)
        assert wait_done(sender, timeout=30) is KVPoll.Success, sender.failure_reason
        state, reason, _ = peer.settle("bad-handle", True)
        assert KVPoll(state) is KVPoll.Success, reason
        assert_arrived(fresh, peer, [1, 2], [5, 6])
        torch.cuda.synchronize()  # the failed open left no CUDA error behind
    finally:
        fresh.close()
