"""The same-node fast path: which mover a sender gets, what it accepts, and what it leaves open.

CI has no GPU, so the CUDA calls are replaced by FAKE CUDA IPC (tests/transport/fake_ipc.py:
CPU tensors of this process stand in for GPU memory and IPC handles). Everything else is the
real code: receiver info and its validation, the choice between the CUDA IPC mover and Mooncake,
the sender's state machine, mappings and their closing, and the first-token record, which goes
over Mooncake tcp on loopback. tests/gpu/test_fast_path_gpu.py runs the real CUDA path.
"""

from __future__ import annotations

import array
import ctypes
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch

from engine.kv_cache import PagedKVCache
from tests.transport.fake_ipc import FAKE_GPU, FakeIpc, FakeRuntime
from tests.transport.peer import FILL, CacheShape, DecodePeer
from tests.transport.test_transfer import wait_done
from transport import (
    FirstToken,
    KVPoll,
    KVReceiver,
    KVSender,
    MetadataSlotsExhausted,
    TransferEndpoint,
    TransportConfig,
)
from transport.cuda_ipc.backend import IpcBackend
from transport.cuda_ipc.driver import node_id
from transport.cuda_ipc.mapping import PeerMapping
from transport.cuda_ipc.mover import CudaIpcMover
from transport.cuda_ipc.staging import SlotDone, _Staging
from transport.endpoint import PendingWrite
from transport.receiver_info import CudaIpcInfo, IpcAllocation, ReceiverInfo
from transport.segments import Segments

SHAPE = CacheShape()
TOKEN = FirstToken(room=7, token_id=3, logprob=-0.25, num_prompt_tokens=9)


class Side:
    """One process's transport in this test process: an endpoint and a KV cache it registered."""

    def __init__(
        self, backend: IpcBackend | None, config: TransportConfig | None = None, fill: bool = False
    ) -> None:
        self.backend = backend
        self.endpoint = TransferEndpoint(config or TransportConfig(), ipc_backend=backend)
        self.cache = PagedKVCache(SHAPE.spec(), first_layer=0, num_layers=SHAPE.num_layers)
        gen = torch.Generator().manual_seed(id(self) % 2**31)
        for layer in self.cache.layers:
            if fill:
                layer.view(torch.uint8).fill_(FILL)
            else:
                layer.copy_(torch.randn(layer.shape, generator=gen))
        self.endpoint.register_cache(self.cache)

    def receiver(self, rid: str, pages: list[int]) -> KVReceiver:
        return KVReceiver(
            self.endpoint,
            rid=rid,
            room=TOKEN.room,
            regions=self.cache.regions(),
            layout=SHAPE.layout(),
            page_indices=pages,
            num_stages=1,
        )

    def sender(self, rid: str) -> KVSender:
        return KVSender(
            self.endpoint,
            rid=rid,
            room=TOKEN.room,
            regions=self.cache.regions(),
            layout=SHAPE.layout(),
            is_last_stage=True,
        )

    def refill(self) -> None:
        for layer in self.cache.layers:
            layer.view(torch.uint8).fill_(FILL)

    def close(self) -> None:
        self.endpoint.close()


@pytest.fixture(scope="module")
def decode() -> Iterator[Side]:
    """A decode side whose (fake) GPU KV is offered over (fake) CUDA IPC."""
    side = Side(FakeIpc(), fill=True)
    yield side
    side.close()


@pytest.fixture(scope="module")
def stage() -> Iterator[Side]:
    """A prefill stage holding every layer in (fake) GPU memory that sees the decode's GPU."""
    side = Side(FakeIpc())
    yield side
    side.close()


@pytest.fixture
def fresh_decode(decode: Side) -> Side:
    decode.refill()
    return decode


_n = 0


def transfer(
    stage: Side,
    decode: Side,
    local: list[int],
    remote: list[int],
    tamper: Callable[[ReceiverInfo], ReceiverInfo] = lambda info: info,
) -> tuple[KVSender, KVReceiver]:
    """One request through the real sender and receiver; returns both, finished."""
    global _n
    _n += 1
    receiver = decode.receiver(f"fp{_n}", remote)
    sender = stage.sender(f"fp{_n}")
    sender.set_receiver_info(tamper(receiver.publish()))
    if sender.poll() is KVPoll.WaitingForInput:
        sender.send(local, TOKEN)
    state = wait_done(sender)
    receiver.on_stage_result(0, state is KVPoll.Success, sender.failure_reason)
    receiver.poll()
    return sender, receiver


def assert_arrived(stage: Side, decode: Side, local: list[int], remote: list[int]) -> None:
    """Addressed pages equal their source; every other decode page still holds the fill."""
    for src, dst in zip(stage.cache.layers, decode.cache.layers, strict=True):
        s, d = src.view(torch.uint8), dst.view(torch.uint8)
        for lp, rp in zip(local, remote, strict=True):
            assert torch.equal(d[:, rp], s[:, lp])
        untouched = [p for p in range(SHAPE.num_pages) if p not in remote]
        assert bool((d[:, untouched] == FILL).all())


def assert_untouched(decode: Side) -> None:
    assert all(bool((layer.view(torch.uint8) == FILL).all()) for layer in decode.cache.layers)


# -- which mover ---------------------------------------------------------------------------------


def test_same_node_gpu_memory_moves_by_ipc_and_arrives_byte_exact(
    stage: Side, fresh_decode: Side
) -> None:
    local, remote = [5, 6, 7, 20, 2], [10, 11, 12, 40, 3]  # a run of three, then scattered
    sender, receiver = transfer(stage, fresh_decode, local, remote)
    assert sender.mover is not None and sender.mover.name == "cuda_ipc", sender.mover
    assert sender.poll() is KVPoll.Success and sender.stats.mover == "cuda_ipc"
    # 4 layers x (K, V) x 3 runs, plus the first-token record, which went by Mooncake.
    assert sender.stats.segments == 4 * 2 * 3 + 1
    assert isinstance(stage.backend, FakeIpc) and stage.backend.page_launches >= 1
    assert receiver.poll() is KVPoll.Success and receiver.first_token == TOKEN
    assert_arrived(stage, fresh_decode, local, remote)
    assert stage.endpoint.metadata.num_held == 0 and fresh_decode.endpoint.metadata.num_held == 0
    assert stage.endpoint.cuda_ipc is not None
    assert stage.endpoint.cuda_ipc.mapped_sessions == {fresh_decode.endpoint.session_id}


def test_receiver_info_offers_node_gpu_and_an_allocation_per_layer(decode: Side) -> None:
    info = decode.receiver("offer", [0]).publish()
    assert info.cuda_ipc is not None
    assert info.cuda_ipc.node_id == node_id() and info.cuda_ipc.device_uuid == FAKE_GPU
    assert len(info.cuda_ipc.allocations) == SHAPE.num_layers  # one tensor per layer here
    sliced = info.for_layers(1, 3)
    assert sliced.cuda_ipc is not None
    kept = {a.base for a in sliced.cuda_ipc.allocations}
    assert (
        kept
        == {a.base for a in sliced.layers}
        == {r.base_address for r in decode.cache.regions()[1:3]}
    )


@pytest.mark.parametrize(
    ("tamper", "why"),
    [
        (
            lambda info: info.model_copy(
                update={"cuda_ipc": info.cuda_ipc.model_copy(update={"node_id": "elsewhere/0"})}
            ),
            "another node",
        ),
        (
            lambda info: info.model_copy(
                update={"cuda_ipc": info.cuda_ipc.model_copy(update={"device_uuid": "GPU-other"})}
            ),
            "not visible",
        ),
        (lambda info: info.model_copy(update={"cuda_ipc": None}), "offers no CUDA IPC"),
    ],
)
def test_a_peer_the_fast_path_cannot_reach_gets_mooncake_and_the_bytes_still_arrive(
    tamper: Callable[[ReceiverInfo], ReceiverInfo], why: str, stage: Side, fresh_decode: Side
) -> None:
    local, remote = [1, 2, 3], [30, 31, 32]
    sender, receiver = transfer(stage, fresh_decode, local, remote, tamper)
    assert sender.mover is not None and sender.mover.name == "mooncake"
    assert why in sender.mover.why
    assert sender.poll() is KVPoll.Success and sender.stats.mover == "mooncake"
    assert receiver.poll() is KVPoll.Success and receiver.first_token == TOKEN
    assert_arrived(stage, fresh_decode, local, remote)


def test_an_ipc_open_failure_falls_back_to_mooncake_once_and_for_all(fresh_decode: Side) -> None:
    backend = FakeIpc(fail_open=True)
    stage = Side(backend)
    try:
        for remote in ([8, 9], [50, 51]):
            sender, receiver = transfer(stage, fresh_decode, [0, 1], remote)
            assert sender.mover is not None and sender.mover.name == "mooncake"
            assert "CUDA IPC open failed" in sender.mover.why
            assert sender.poll() is KVPoll.Success and receiver.poll() is KVPoll.Success
        assert_arrived(stage, fresh_decode, [0, 1, 0, 1], [8, 9, 50, 51])
        assert stage.endpoint.cuda_ipc is not None
        assert stage.endpoint.cuda_ipc.mapped_sessions == set()
        assert not stage.endpoint.liveness.watched
    finally:
        stage.close()


def test_cpu_memory_on_either_side_gets_mooncake(fresh_decode: Side) -> None:
    # The real CUDA backend on CPU tensors: nothing to export, nothing to copy from.
    cpu_stage = Side(None)
    cpu_decode = Side(None, fill=True)
    try:
        info = cpu_decode.receiver("cpu", [0]).publish()
        assert info.cuda_ipc is None
        sender, _ = transfer(cpu_stage, fresh_decode, [4, 5], [60, 61])  # decode offers, we can't
        assert sender.mover is not None and sender.mover.name == "mooncake"
        assert "CPU memory" in sender.mover.why
        assert sender.poll() is KVPoll.Success
        assert_arrived(cpu_stage, fresh_decode, [4, 5], [60, 61])
    finally:
        cpu_stage.close()
        cpu_decode.close()


def test_turning_the_fast_path_off_uses_mooncake_on_both_sides(fresh_decode: Side) -> None:
    off = TransportConfig(cuda_ipc=False)
    stage = Side(FakeIpc(), off)
    decode_off = Side(FakeIpc(), off, fill=True)
    try:
        assert decode_off.receiver("off", [0]).publish().cuda_ipc is None
        sender, _ = transfer(stage, fresh_decode, [2, 3], [1, 2])
        assert sender.mover is not None and sender.mover.name == "mooncake"
        assert "turned off" in sender.mover.why
        assert sender.poll() is KVPoll.Success
        assert_arrived(stage, fresh_decode, [2, 3], [1, 2])
    finally:
        stage.close()
        decode_off.close()


# -- what it accepts -----------------------------------------------------------------------------


def _ipc(info: ReceiverInfo, **update: object) -> ReceiverInfo:
    assert info.cuda_ipc is not None
    return info.model_copy(update={"cuda_ipc": info.cuda_ipc.model_copy(update=update)})


def _allocs(info: ReceiverInfo) -> tuple[IpcAllocation, ...]:
    assert info.cuda_ipc is not None
    return info.cuda_ipc.allocations


def _first_handle(info: ReceiverInfo, handle: str) -> ReceiverInfo:
    first, *rest = _allocs(info)
    return _ipc(info, allocations=(first.model_copy(update={"handle": handle}), *rest))


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (
            lambda i: _first_handle(i, "zz" * 64),
            "not 128 hex digits",
        ),
        (
            lambda i: _first_handle(i, "ab"),
            "not 128 hex digits",
        ),
        (lambda i: _ipc(i, allocations=()), "no CUDA IPC handle covers"),
        (
            # Each fake allocation is exactly one layer: leave out layer 0's.
            lambda i: _ipc(
                i, allocations=tuple(a for a in _allocs(i) if a.base != i.layers[0].base)
            ),
            "layer 0: no CUDA IPC handle covers",
        ),
        (
            lambda i: _ipc(
                i,
                allocations=tuple(
                    a.model_copy(update={"nbytes": a.nbytes // 2}) for a in _allocs(i)
                ),
            ),
            "no CUDA IPC handle covers",
        ),
        (
            lambda i: _ipc(
                i,
                allocations=(
                    *_allocs(i),
                    _allocs(i)[0].model_copy(update={"base": _allocs(i)[0].base + 8}),
                ),
            ),
            "overlap",
        ),
    ],
)
def test_bad_ipc_handles_fail_the_request_like_bad_addresses_and_write_nothing(
    tamper: Callable[[ReceiverInfo], ReceiverInfo], reason: str, stage: Side, fresh_decode: Side
) -> None:
    sender, receiver = transfer(stage, fresh_decode, [0, 1], [3, 4], tamper)
    assert sender.poll() is KVPoll.Failed
    assert "invalid receiver info" in (sender.failure_reason or "")
    assert reason in (sender.failure_reason or ""), sender.failure_reason
    sender.send([0, 1], TOKEN)  # the scheduler may still call send: it must do nothing
    assert sender.poll() is KVPoll.Failed and sender.mover is None
    assert receiver.poll() is KVPoll.Failed
    assert_untouched(fresh_decode)


# -- what it leaves open -------------------------------------------------------------------------


def _wait_until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_a_peer_that_goes_away_has_its_mappings_closed() -> None:
    """A real decode process (Mooncake tcp) whose offer maps, by FAKE IPC, onto local tensors."""
    peer = DecodePeer(SHAPE)
    backend = FakeIpc()
    stage = Side(backend, TransportConfig(liveness_interval_s=0.1))
    try:
        info = peer.receive("gone", TOKEN.room, [0, 1], num_stages=1)
        stand_ins = [torch.zeros(a.nbytes, dtype=torch.uint8) for a in info.layers]
        offer = CudaIpcInfo(
            node_id=node_id(),
            device_uuid=FAKE_GPU,
            allocations=tuple(
                FakeIpc.export_as(t, a.base) for t, a in zip(stand_ins, info.layers, strict=True)
            ),
        )
        sender = stage.sender("gone")
        sender.set_receiver_info(info.model_copy(update={"cuda_ipc": offer}))
        assert sender.mover is not None and sender.mover.name == "cuda_ipc"
        path = stage.endpoint.cuda_ipc
        assert path is not None and path.mapped_sessions == {peer.session_id}
        assert backend.opened == SHAPE.num_layers and backend.closed == 0
        peer.kill()
        _wait_until(lambda: not path.mapped_sessions)
        assert backend.closed == backend.opened
        assert wait_done(sender) is KVPoll.Failed  # and the request waiting on it fails
        sender.abort()
        _wait_until(lambda: not stage.endpoint.liveness.watched)
    finally:
        stage.close()
        peer.stop()


def test_a_mapping_closed_during_a_copy_unmaps_when_the_copy_ends() -> None:
    backend = FakeIpc()
    tensor = torch.zeros(64, dtype=torch.uint8)
    mapping = PeerMapping("peer:1", torch.device("cpu"), backend, same_device=True)
    mapping.open_all([backend.export(tensor)])
    start, length = np.array([tensor.data_ptr() + 8]), np.array([8])
    assert mapping.acquire()
    mapping.close()
    assert backend.closed == 0  # the copy still uses it
    assert not mapping.acquire()  # no new copy starts on a closed mapping
    assert mapping.translate(start, length)[1].all()
    mapping.release()
    assert backend.closed == 1 and not mapping.translate(start, length)[1].any()


def test_only_runs_inside_local_device_memory_and_a_mapped_allocation_are_copied(
    stage: Side,
) -> None:
    """Planning a write: the rest (CPU memory, or past the mapped allocation) goes by Mooncake."""
    path = stage.endpoint.cuda_ipc
    assert path is not None
    peer_memory = torch.zeros(1024, dtype=torch.uint8)
    backend = FakeIpc()
    mapping = PeerMapping("peer:2", torch.device("cpu"), backend, same_device=True)
    remote_base = 1 << 40  # where the allocation lives in the (pretend) peer process
    mapping.open_all([FakeIpc.export_as(peer_memory, remote_base)])
    layer = stage.cache.regions()[1].base_address
    segments = Segments()
    segments.add(layer + 256, remote_base + 512, 256)  # copied
    segments.add(layer, remote_base + 1000, 256)  # runs past the allocation's end
    segments.add(stage.endpoint.metadata.base_address, remote_base, 64)  # CPU metadata
    copies, rest = path.plan(segments, mapping)
    assert copies.srcs.tolist() == [layer + 256]
    assert copies.dsts.tolist() == [peer_memory.data_ptr() + 512]
    assert copies.lengths.tolist() == [256]
    assert rest.dsts == [remote_base + 1000, remote_base]


def test_closing_the_endpoint_unmaps_every_peer(fresh_decode: Side) -> None:
    backend = FakeIpc()
    stage = Side(backend)
    sender, _ = transfer(stage, fresh_decode, [0], [0])
    assert sender.poll() is KVPoll.Success and backend.opened == SHAPE.num_layers
    stage.close()
    assert backend.closed == backend.opened
    assert stage.endpoint.cuda_ipc is not None and not stage.endpoint.cuda_ipc.mapped_sessions


# -- launched from `send`: no pool hop, finished by `poll` ---------------------------------------


def _sender(side: Side, rid: str, last: bool = True) -> KVSender:
    return KVSender(
        side.endpoint,
        rid=rid,
        room=TOKEN.room,
        regions=side.cache.regions(),
        layout=SHAPE.layout(),
        is_last_stage=last,
    )


def test_send_launches_the_copy_on_its_own_thread_and_the_pool_is_not_used(
    fresh_decode: Side, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = FakeIpc()
    stage = Side(backend)
    try:

        def no_pool(*args: object) -> None:
            raise AssertionError("the fast path went through the transfer pool")

        monkeypatch.setattr(stage.endpoint, "submit", no_pool)
        monkeypatch.setattr(stage.endpoint, "run_soon", no_pool)
        for n, (local, remote) in enumerate((([0, 1, 2], [7, 8, 9]), ([3, 9], [20, 22]))):
            receiver = fresh_decode.receiver(f"own{n}", remote)
            sender = _sender(stage, f"own{n}", last=n == 0)  # a last and a middle stage
            sender.set_receiver_info(receiver.publish())
            sender.send(local, TOKEN if n == 0 else None)
            assert wait_done(sender) is KVPoll.Success, sender.failure_reason
            assert sender.stats.mover == "cuda_ipc" and not sender.in_flight
            runs = 1 if n == 0 else 2
            assert sender.stats.segments == SHAPE.num_layers * 2 * runs + (n == 0)
            receiver.abort("test done")
        assert backend.page_launches == 2 and backend.launches == 0
        assert set(backend.launch_threads) == {threading.get_ident()}
        # The route (both sides' layer starts, on the device) was worked out once per peer.
        assert backend.routes_prepared == 1
        assert_arrived(stage, fresh_decode, [0, 1, 2, 3, 9], [7, 8, 9, 20, 22])
        assert stage.endpoint.metadata.num_held == 0
    finally:
        stage.close()


def _mapping(side: Side, decode: Side) -> PeerMapping:
    path = side.endpoint.cuda_ipc
    assert path is not None
    return path._mappings[decode.endpoint.session_id]


def mapping_users(mapping: PeerMapping) -> int:
    """Copies holding `mapping` open (it unmaps after the last, once closed): the count the
    mapping keeps for itself, read here because only tests ask for it."""
    return mapping._users


@pytest.fixture
def held() -> Iterator[tuple[FakeIpc, Side]]:
    """A stage whose (fake) copies sit queued behind compute until `backend.finish()`."""
    backend = FakeIpc(hold=True)
    stage = Side(backend)
    yield backend, stage
    stage.close()


def ready(stage: Side, decode: Side, rid: str, remote: list[int]) -> tuple[KVReceiver, KVSender]:
    """A receiver for `remote` and a stage sender holding its info: waiting for input."""
    receiver = decode.receiver(rid, remote)
    sender = stage.sender(rid)
    sender.set_receiver_info(receiver.publish())
    return receiver, sender


def test_success_waits_until_the_copy_and_the_record_have_landed(
    held: tuple[FakeIpc, Side], fresh_decode: Side
) -> None:
    backend, stage = held
    local, remote = [4, 5], [33, 34]
    receiver, sender = ready(stage, fresh_decode, "held", remote)
    sender.send(local, TOKEN)
    for _ in range(5):
        assert sender.poll() is KVPoll.Transferring
        time.sleep(0.01)
    assert sender.in_flight and mapping_users(_mapping(stage, fresh_decode)) == 1
    assert stage.endpoint.metadata.num_held == 1  # the record's source slot
    assert_untouched(fresh_decode)
    backend.finish()
    assert sender.poll() is KVPoll.Success, sender.failure_reason
    assert not sender.in_flight and mapping_users(_mapping(stage, fresh_decode)) == 0
    assert stage.endpoint.metadata.num_held == 0
    receiver.on_stage_result(0, True)
    assert receiver.poll() is KVPoll.Success and receiver.first_token == TOKEN
    assert_arrived(stage, fresh_decode, local, remote)


def test_the_kv_can_go_before_the_first_token_and_success_waits_for_both(
    held: tuple[FakeIpc, Side],
    fresh_decode: Side,
) -> None:
    """The stage's order: `send` once the forward is queued, the token once sampled."""
    backend, stage = held
    local, remote = [2, 3], [40, 41]
    receiver, sender = ready(stage, fresh_decode, "kv-first", remote)
    sender.send(local)
    assert backend.page_launches == 1  # the copy is queued at once
    assert stage.endpoint.metadata.num_held == 0  # no record before the token
    backend.finish()
    for _ in range(5):  # the KV landed, but the request is not done without its token
        assert sender.poll() is KVPoll.Transferring and sender.in_flight
        time.sleep(0.01)
    sender.send_first_token(TOKEN)
    assert wait_done(sender) is KVPoll.Success, sender.failure_reason
    assert not sender.in_flight and stage.endpoint.metadata.num_held == 0
    assert sender.stats.segments == SHAPE.num_layers * 2 + 1
    receiver.on_stage_result(0, True)
    assert receiver.poll() is KVPoll.Success and receiver.first_token == TOKEN
    assert_arrived(stage, fresh_decode, local, remote)


def test_a_token_whose_record_cannot_start_fails_the_request_never_succeeds_it(
    held: tuple[FakeIpc, Side], fresh_decode: Side, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend, stage = held
    receiver, sender = ready(stage, fresh_decode, "no-slot", [12])
    sender.send([3])
    backend.finish()  # the KV landed: only the record stands between it and Success

    def exhausted() -> int:
        assert sender.poll() is KVPoll.Transferring  # a poll in the gap settles nothing
        raise MetadataSlotsExhausted("every metadata slot is held")

    monkeypatch.setattr(stage.endpoint.metadata, "acquire", exhausted)
    sender.send_first_token(TOKEN)
    assert sender.poll() is KVPoll.Failed
    assert "every metadata slot is held" in (sender.failure_reason or "")
    _wait_until(lambda: not sender.in_flight)
    assert mapping_users(_mapping(stage, fresh_decode)) == 0
    receiver.abort("test done")


def test_an_abort_between_the_kv_and_the_token_gives_everything_back(
    held: tuple[FakeIpc, Side],
    fresh_decode: Side,
) -> None:
    backend, stage = held
    receiver, sender = ready(stage, fresh_decode, "kv-then-abort", [9])
    sender.send([1])
    sender.abort("dropped by consensus")
    sender.send_first_token(TOKEN)  # too late: ignored, no record, no slot
    assert stage.endpoint.metadata.num_held == 0
    assert sender.in_flight  # the copy still reads this stage's pages
    backend.finish()
    _wait_until(lambda: not sender.in_flight)
    assert mapping_users(_mapping(stage, fresh_decode)) == 0
    assert sender.poll() is KVPoll.Failed
    receiver.abort("test done")


def test_abort_with_a_copy_still_queued_holds_pages_and_mapping_until_it_ends(
    held: tuple[FakeIpc, Side],
    fresh_decode: Side,
) -> None:
    backend, stage = held
    receiver, sender = ready(stage, fresh_decode, "gone-mid", [1, 2])
    sender.send([6, 7], TOKEN)
    sender.abort()
    sender.abort()
    assert sender.poll() is KVPoll.Failed and sender.failure_reason == "aborted"
    assert sender.in_flight  # the GPU may still read this stage's pages
    path = stage.endpoint.cuda_ipc
    assert path is not None
    path.drop_peer(fresh_decode.endpoint.session_id)  # and the peer goes away
    assert backend.closed == 0  # a copy still uses the mapping: not unmapped yet
    backend.finish()
    _wait_until(lambda: not sender.in_flight)
    assert backend.closed == backend.opened == SHAPE.num_layers
    assert stage.endpoint.metadata.num_held == 0
    assert sender.poll() is KVPoll.Failed  # a late completion does not revive it
    receiver.abort("test done")


def test_a_transfer_timeout_with_a_copy_still_queued_fails_then_releases(
    fresh_decode: Side,
) -> None:
    backend = FakeIpc(hold=True)
    stage = Side(backend, TransportConfig(transfer_timeout_s=0.2))
    try:
        receiver, sender = ready(stage, fresh_decode, "slow-ipc", [3])
        sender.send([0], TOKEN)
        assert wait_done(sender) is KVPoll.Failed
        assert "transfer timeout" in (sender.failure_reason or "")
        assert sender.in_flight and mapping_users(_mapping(stage, fresh_decode)) == 1
        backend.finish()
        _wait_until(lambda: not sender.in_flight)
        assert mapping_users(_mapping(stage, fresh_decode)) == 0
        assert stage.endpoint.metadata.num_held == 0
        receiver.abort("test done")
    finally:
        stage.close()


def test_a_failed_first_token_record_fails_the_write(
    stage: Side, fresh_decode: Side, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refused(*args: object) -> PendingWrite:
        return PendingWrite(None, None, "first-token record not submitted")

    monkeypatch.setattr(stage.endpoint, "write_async", refused)
    sender, receiver = transfer(stage, fresh_decode, [0], [5])
    assert sender.poll() is KVPoll.Failed
    assert "first-token record not submitted" in (sender.failure_reason or "")
    assert not sender.in_flight and stage.endpoint.metadata.num_held == 0
    assert mapping_users(_mapping(stage, fresh_decode)) == 0
    assert receiver.poll() is KVPoll.Failed


def test_pages_a_route_cannot_take_go_the_general_way_and_arrive(
    stage: Side, fresh_decode: Side
) -> None:
    """Receiver pages spaced two apart (a page stride of two pages): no route, segments."""
    assert isinstance(stage.backend, FakeIpc)
    before = stage.backend.launches

    def spaced(info: ReceiverInfo) -> ReceiverInfo:
        layers = tuple(a.model_copy(update={"page_stride": 2 * a.page_stride}) for a in info.layers)
        return info.model_copy(update={"layers": layers})

    local, remote = [1, 2], [3, 4]
    sender, receiver = transfer(stage, fresh_decode, local, remote, spaced)
    assert isinstance(sender.mover, CudaIpcMover) and sender.mover.route is None
    assert sender.poll() is KVPoll.Success and sender.stats.mover == "cuda_ipc"
    assert stage.backend.launches == before + 1
    assert sender.stats.segments == SHAPE.num_layers * 2 * 2 + 1  # a segment per page
    assert receiver.poll() is KVPoll.Success
    assert_arrived(stage, fresh_decode, local, [6, 8])


def test_page_runs_are_planned_per_run_and_out_of_range_pages_are_not(
    stage: Side, decode: Side
) -> None:
    sender = stage.sender("plan")
    sender.set_receiver_info(decode.receiver("plan", [10, 11, 12, 40, 3, 4]).publish())
    mover = sender.mover
    assert isinstance(mover, CudaIpcMover) and mover.route is not None
    words = SHAPE.layout().page_nbytes // 8
    runs = mover.plan_pages([5, 6, 7, 20, 2, 3])
    assert runs is not None
    assert (runs.rows() // words).tolist() == [[5, 10, 3], [20, 40, 1], [2, 3, 2]]
    assert mover.plan_pages([]) is not None and len(mover.plan_pages([])) == 0
    assert mover.plan_pages([SHAPE.num_pages]) is None  # not a page of this cache
    assert mover.plan_pages([-1]) is None
    sender.abort()


def test_a_peer_gone_between_bootstrap_and_send_fails_the_write_and_frees_the_slot(
    fresh_decode: Side,
) -> None:
    backend = FakeIpc()
    stage = Side(backend)
    try:
        receiver = fresh_decode.receiver("gone-before", [9])
        sender = stage.sender("gone-before")
        sender.set_receiver_info(receiver.publish())
        path = stage.endpoint.cuda_ipc
        assert path is not None
        path.drop_peer(fresh_decode.endpoint.session_id)  # unmapped: no copy may start
        sender.send([1], TOKEN)
        assert sender.poll() is KVPoll.Failed
        assert "the peer went away" in (sender.failure_reason or "")
        _wait_until(lambda: not sender.in_flight)  # the record, submitted first, has ended
        assert stage.endpoint.metadata.num_held == 0 and backend.page_launches == 0
        receiver.abort("test done")
    finally:
        stage.close()


def test_contiguous_pages_plan_as_one_run_and_anything_else_as_several(
    stage: Side, decode: Side
) -> None:
    sender = stage.sender("plan1")
    sender.set_receiver_info(decode.receiver("plan1", [10, 11, 12, 13]).publish())
    mover = sender.mover
    assert isinstance(mover, CudaIpcMover) and mover.route is not None
    words = SHAPE.layout().page_nbytes // 8
    one = mover.plan_pages([5, 6, 7, 8])
    # One run is three plain ints: a request's usual path makes no numpy call.
    assert one is not None and one.flat == (5 * words, 10 * words, 4 * words)
    assert all(type(value) is int for value in one.flat) and one.words == 4 * words
    prefix = mover.plan_pages([5, 6])  # fewer pages than offered: the first ones
    assert prefix is not None and (prefix.rows() // words).tolist() == [[5, 10, 2]]
    split = mover.plan_pages([5, 7, 8, 9])
    assert split is not None and (split.rows() // words).tolist() == [[5, 10, 1], [7, 11, 3]]
    assert all(type(value) is int for value in split.flat) and split.longest == 3 * words
    assert mover.plan_pages([SHAPE.num_pages - 2, SHAPE.num_pages - 1, SHAPE.num_pages]) is None
    assert mover.plan_pages([0, 1, 2, 3, 4]) is None  # more pages than the receiver offered
    sender.abort()


# -- the per-request staging: slots of run tables and the events that end their copies ----------


def _staging() -> tuple[_Staging, FakeRuntime]:
    runtime = FakeRuntime()
    return _Staging(runtime, torch.device("cpu")), runtime


def test_a_staging_slot_is_written_again_only_after_the_copy_that_read_it_finished() -> None:
    staging, runtime = _staging()
    with staging.lock:
        taken = []
        for _ in range(_Staging.SLOTS):  # every slot's copy still queued behind compute
            slot, gen = staging.take()
            runtime.record(staging.events[slot])
            taken.append((slot, gen))
        assert [s for s, _ in taken] == list(range(_Staging.SLOTS)) and runtime.synchronizes == 0
        slot, gen = staging.take()  # the ring came round: wait for the oldest copy
    assert (slot, gen) == (0, 2) and runtime.synchronizes == 1
    assert SlotDone(staging, *taken[0]).query()  # that copy is known done now
    assert not SlotDone(staging, *taken[1]).query()  # the others are not


def test_a_slot_taken_again_never_reports_the_newer_request_done_early() -> None:
    staging, runtime = _staging()
    with staging.lock:
        first = SlotDone(staging, *staging.take())
    runtime.record(staging.events[first.slot])
    assert not first.query()
    runtime.finish(staging.events[first.slot])
    assert first.query()
    with staging.lock:
        newer = SlotDone(staging, *staging.take())  # the lowest free slot: the same one
    runtime.record(staging.events[newer.slot])
    assert newer.slot == first.slot and newer.gen == first.gen + 1
    assert first.query()  # the older request stays done
    assert not newer.query()  # its own record has not passed
    newer.synchronize()
    assert newer.query()


def test_requests_one_at_a_time_reuse_one_slot_and_a_full_ring_waits_for_its_oldest() -> None:
    """The lowest free slot is taken (its graph stays warm); with every slot busy, a request
    waits for the oldest copy, not for the slot it took last."""
    staging, runtime = _staging()

    def take() -> SlotDone:
        with staging.lock:
            done = SlotDone(staging, *staging.take())
        runtime.record(staging.events[done.slot])
        return done

    for _ in range(5):  # each polled to its end before the next
        done = take()
        runtime.finish(staging.events[done.slot])
        assert done.query() and done.slot == 0
    a, b = take(), take()
    assert (a.slot, b.slot) == (0, 1)
    runtime.finish(staging.events[a.slot])
    assert a.query()
    c = take()  # slot 0 is free again, slot 1 is not
    assert c.slot == 0 and c.gen == a.gen + 1
    rest = [take() for _ in range(_Staging.SLOTS - 2)]
    assert [d.slot for d in rest] == list(range(2, _Staging.SLOTS))
    assert runtime.synchronizes == 0
    d = take()  # every slot busy: the oldest copy is b's (slot 1), not c's (slot 0, newer)
    assert (d.slot, d.gen) == (1, b.gen + 1) and runtime.synchronizes == 1
    assert b.query() and not c.query()


def test_a_slot_view_writes_the_words_the_gpu_reads_at_that_slot_address() -> None:
    """A request writes its table through the slot's memoryview; the graph reads the slot's
    address. Other slots and the always-empty one stay zero."""
    staging, _ = _staging()
    view = staging.views[3]
    view[0] = 2
    view[1:7] = array.array("q", (10, 20, 30, 40, 50, 60))

    def words(address: int, n: int) -> list[int]:
        return list((ctypes.c_int64 * n).from_address(address))

    assert words(staging.addresses[3], 7) == [2, 10, 20, 30, 40, 50, 60]
    assert words(staging.addresses[2], staging.words) == [0] * staging.words
    assert words(staging.addresses[4], 7) == [0] * 7
    assert words(staging.empty, staging.words) == [0] * staging.words


def test_a_polled_slot_is_taken_again_without_a_cuda_call() -> None:
    """The scheduler polls each copy to its end: the ring then never queries or waits."""
    staging, runtime = _staging()
    for _ in range(3 * _Staging.SLOTS):
        with staging.lock:
            done = SlotDone(staging, *staging.take())
        runtime.record(staging.events[done.slot])
        runtime.finish(staging.events[done.slot])
        assert done.query()
    assert runtime.synchronizes == 0
    assert runtime.queries == 3 * _Staging.SLOTS  # one per poll that found the copy done
