"""A failed write never poisons the next one to the same peer; the fault hook and the readiness
probe that tests, chaos soaks and health checks use."""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch

from tests.transport.conftest import make_stages
from tests.transport.peer import FILL, CacheShape, DecodePeer, PrefillStage
from tests.transport.test_bounded_writes import BIG
from tests.transport.test_transfer import assert_pages_arrived, transfer, wait_done
from transport import FirstToken, KVPoll, TransferEndpoint, TransportConfig, TransportFaults


def token(room: int) -> FirstToken:
    return FirstToken(room=room, token_id=room + 1, logprob=-0.5, num_prompt_tokens=8)


def assert_arrived(
    stage: PrefillStage, decode: DecodePeer, local: list[int], remote: list[int]
) -> None:
    """The addressed decode pages equal their source (other pages may hold anything)."""
    got = decode.layers()
    for layer in stage.layers:
        src = stage.cache.layers[layer].view(torch.uint8)
        for lp, rp in zip(local, remote, strict=True):
            assert torch.equal(got[layer][:, rp], src[:, lp]), (layer, lp, rp)


class WedgedEngine:
    """A Mooncake engine whose path to every peer is wedged the way tcp's gets: writes and reads
    fail while probes are answered."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def batch_transfer_sync_write(self, *args: Any) -> int:
        return -1

    def batch_transfer_sync_read(self, *args: Any) -> int:
        return -1

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)


def test_fault_hook_is_off_by_default_and_fails_exactly_the_writes_it_was_told_to() -> None:
    faults = TransportFaults()
    assert not faults.active and not faults.take_write_failure("p:1")
    faults.fail_next_writes(2)
    assert faults.active
    assert [faults.take_write_failure("p:1") for _ in range(3)] == [True, True, False]
    assert not faults.active
    faults.set_unreachable("p:1", True)
    assert faults.unreachable("p:1") and not faults.unreachable("p:2")
    assert faults.take_write_failure("p:1") and not faults.take_write_failure("p:2")
    faults.set_unreachable(None, True)
    assert faults.unreachable("p:2")
    faults.clear()
    assert not faults.active and not faults.unreachable("p:1")
    with pytest.raises(ValueError):
        faults.fail_next_writes(-1)


def test_a_failed_write_then_the_next_request_on_the_same_peer_succeeds(
    decode: DecodePeer, shape: CacheShape
) -> None:
    (stage,) = make_stages(shape, [0, 4])
    try:
        endpoint = stage.endpoint
        endpoint.faults.fail_next_writes(1)
        (failed,) = transfer([stage], decode, "f1", 1, [[0, 1]], [10, 11], token(1))
        assert failed.poll() is KVPoll.Failed
        assert failed.failure_reason == f"KV write to {decode.session_id} failed (rc=-1)"
        assert KVPoll(decode.poll("f1")[0]) is KVPoll.Failed
        assert not endpoint.faults.active  # its one failure used up
        (ok,) = transfer([stage], decode, "f2", 2, [[2, 3]], [12, 13], token(2))
        assert ok.poll() is KVPoll.Success, ok.failure_reason
        state, reason, first = decode.poll("f2")
        assert KVPoll(state) is KVPoll.Success, reason
        assert first == token(2)
        assert_pages_arrived([stage], decode, [([[2, 3]], [12, 13])])
        assert (endpoint.repairs, endpoint.rebuilds) == (1, 0)  # checked, and found working
    finally:
        stage.close()


def test_a_batch_mooncake_refuses_then_the_next_request_on_the_same_peer_succeeds() -> None:
    """The real failure: with the bound raised past Mooncake's tcp queue, a scattered request's
    one batch is refused (queue-full, rc -1), its accepted part still landing afterwards, and
    the path to the peer may stay wedged; the next request to that peer still succeeds."""
    decode = DecodePeer(BIG)
    (stage,) = make_stages(BIG, [0, 4], TransportConfig(max_segments_per_write=100_000))
    try:
        scattered = list(range(1, 1024, 2))  # 4 layers x (K, V) x 512 runs: 4096 segments
        for attempt in range(3):
            rid = f"big{attempt}"
            room = 10 + attempt
            (big,) = transfer([stage], decode, rid, room, [scattered], scattered, token(room))
            assert big.poll() is KVPoll.Failed
            assert big.failure_reason == f"KV write to {decode.session_id} failed (rc=-1)"
            pages = [2 * attempt, 2 * attempt + 100]  # even pages: the failed write's are odd
            rid = f"next{attempt}"
            (ok,) = transfer([stage], decode, rid, room + 10, [pages], pages, token(room + 10))
            assert ok.poll() is KVPoll.Success, ok.failure_reason
            assert KVPoll(decode.poll(rid)[0]) is KVPoll.Success
            assert_arrived(stage, decode, pages, pages)
        assert stage.endpoint.repairs == 3  # once after each refused batch
    finally:
        decode.stop()
        stage.close()


def test_a_wedged_path_to_a_peer_moves_to_a_fresh_engine_and_the_next_request_lands(
    decode: DecodePeer, shape: CacheShape, monkeypatch: pytest.MonkeyPatch
) -> None:
    (stage,) = make_stages(shape, [0, 4])
    try:
        endpoint = stage.endpoint
        session = endpoint.session_id
        monkeypatch.setattr(endpoint, "_engine", WedgedEngine(endpoint._engine))
        (failed,) = transfer([stage], decode, "w1", 1, [[0]], [30], token(1))
        assert failed.poll() is KVPoll.Failed
        (ok,) = transfer([stage], decode, "w2", 2, [[4, 5, 9]], [31, 32, 40], token(2))
        assert ok.poll() is KVPoll.Success, ok.failure_reason
        assert KVPoll(decode.poll("w2")[0]) is KVPoll.Success
        assert_pages_arrived([stage], decode, [([[4, 5, 9]], [31, 32, 40])])
        assert (endpoint.repairs, endpoint.rebuilds) == (1, 1)
        assert endpoint.session_id == session  # peers still address the first engine
    finally:
        stage.close()


def test_an_unreachable_peer_fails_probes_and_writes_until_the_hook_is_cleared(
    decode: DecodePeer, shape: CacheShape
) -> None:
    (stage,) = make_stages(shape, [0, 4], TransportConfig(liveness_interval_s=60))
    try:
        endpoint = stage.endpoint
        assert endpoint.reachable(decode.session_id)
        endpoint.faults.set_unreachable(decode.session_id, True)
        assert not endpoint.reachable(decode.session_id)
        (failed,) = transfer([stage], decode, "u1", 1, [[0]], [20], token(1))
        assert failed.poll() is KVPoll.Failed
        assert failed.failure_reason == f"KV write to {decode.session_id} failed (rc=-1)"
        assert all(bool((layer == FILL).all()) for layer in decode.layers())
        endpoint.faults.set_unreachable(decode.session_id, False)
        assert endpoint.reachable(decode.session_id)
        (ok,) = transfer([stage], decode, "u2", 2, [[1]], [21], token(2))
        assert ok.poll() is KVPoll.Success, ok.failure_reason
        assert_pages_arrived([stage], decode, [([[1]], [21])])
    finally:
        stage.close()


def test_every_peer_unreachable_fails_a_waiting_sender_through_liveness(
    decode: DecodePeer, shape: CacheShape
) -> None:
    (stage,) = make_stages(shape, [0, 4], TransportConfig(liveness_interval_s=0.1))
    try:
        sender = stage.sender_to(decode, "l1", 1, [5])
        stage.endpoint.faults.set_unreachable(None, True)
        assert wait_done(sender, timeout=5) is KVPoll.Failed
        assert f"peer {decode.session_id} unreachable (probe rc=-1)" == sender.failure_reason
        assert not stage.endpoint.reachable(decode.session_id)
        stage.endpoint.faults.set_unreachable(None, False)
        assert stage.endpoint.reachable(decode.session_id)
    finally:
        stage.close()


def test_the_readiness_probe_answers_within_its_timeout_even_for_a_frozen_peer(
    shape: CacheShape,
) -> None:
    decode = DecodePeer(shape)
    endpoint = TransferEndpoint(TransportConfig())
    try:
        assert endpoint.reachable(decode.session_id)
        assert not endpoint.reachable("127.0.0.1:1")  # nothing listens there
        decode.pause()  # Mooncake's own probe of a frozen peer takes about 60 s
        start = time.monotonic()
        assert not endpoint.reachable(decode.session_id, timeout_s=0.2)
        assert not endpoint.reachable(decode.session_id, timeout_s=0.2)  # the same probe
        assert time.monotonic() - start < 1.0
        decode.resume()
        deadline = time.monotonic() + 10
        while not endpoint.reachable(decode.session_id):
            assert time.monotonic() < deadline, "peer never reachable again"
        endpoint.close()
        assert not endpoint.reachable(decode.session_id)
    finally:
        decode.resume()
        decode.stop()
        endpoint.close()
