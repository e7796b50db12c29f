"""Every way a transfer can go wrong ends in a stated end state with nothing left held."""

from __future__ import annotations

import time

import pytest
import torch

from tests.transport.conftest import make_stages
from tests.transport.peer import FILL, CacheShape, DecodePeer, PrefillStage
from tests.transport.test_transfer import wait_done, wait_for
from transport import FirstToken, IllegalTransition, KVPoll, TransportConfig
from transport.receiver_info import KVLayout, LayerAddress

TOKEN = FirstToken(room=5, token_id=2, logprob=-0.1, num_prompt_tokens=8)


def assert_released(stages: list[PrefillStage]) -> None:
    for stage in stages:
        assert stage.endpoint.metadata.num_held == 0
        assert not stage.endpoint.liveness.watched


def assert_decode_untouched(decode: DecodePeer) -> None:
    for layer in decode.layers():
        assert bool((layer == FILL).all())


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (lambda info: info.model_copy(update={"page_indices": (3, 64)}), "outside"),
        (
            lambda info: info.model_copy(
                update={
                    "layers": tuple(
                        a.model_copy(update={"nbytes": a.nbytes // 2}) for a in info.layers
                    )
                }
            ),
            "outside",
        ),
        (
            lambda info: info.model_copy(
                update={"layout": info.layout.model_copy(update={"page_size": 8})}
            ),
            "page_size",
        ),
        (
            lambda info: info.model_copy(
                update={"layout": info.layout.model_copy(update={"dtype": "bfloat16"})}
            ),
            "dtype",
        ),
        (
            lambda info: info.model_copy(
                update={"layout": info.layout.model_copy(update={"num_kv_heads": 4})}
            ),
            "num_kv_heads",
        ),
        (lambda info: info.model_copy(update={"layers": info.layers[:1]}), "lacks layers"),
        (lambda info: info.model_copy(update={"page_indices": (1, 1)}), "repeat"),
        (lambda info: info.model_copy(update={"room": 6}), "not r/5"),
    ],
)
def test_bad_receiver_info_fails_the_request_and_writes_nothing(
    tamper, reason: str, stages: list[PrefillStage], decode: DecodePeer
) -> None:
    info = decode.receive("r", 5, [3, 4], num_stages=2)
    sender = stages[0].sender("r", 5)
    sender.set_receiver_info(tamper(info))
    assert sender.poll() is KVPoll.Failed
    assert reason in (sender.failure_reason or "")
    sender.send([0, 1])  # the scheduler may still call send: it must do nothing
    assert sender.poll() is KVPoll.Failed
    decode.result("r", 0, False, sender.failure_reason)
    state, decode_reason, _ = decode.poll("r")
    assert KVPoll(state) is KVPoll.Failed and reason in decode_reason
    assert_decode_untouched(decode)
    assert_released(stages)
    decode.abort("r")
    assert decode.slots_held() == 0


def test_sender_refuses_more_pages_than_the_receiver_offered(
    stages: list[PrefillStage], decode: DecodePeer
) -> None:
    info = decode.receive("r", 5, [3], num_stages=2)
    sender = stages[0].sender("r", 5)
    sender.set_receiver_info(info)
    sender.send([0, 1])
    assert sender.poll() is KVPoll.Failed and "offered 1" in (sender.failure_reason or "")
    assert_decode_untouched(decode)


def test_bootstrap_timeout_fails_a_sender_that_never_gets_receiver_info(shape: CacheShape) -> None:
    (stage,) = make_stages(shape, [0, 4], TransportConfig(bootstrap_timeout_s=0.3))
    try:
        sender = stage.sender("late", 1)
        assert sender.poll() is KVPoll.Bootstrapping
        time.sleep(0.4)
        assert sender.poll() is KVPoll.Failed
        assert "bootstrap timeout" in (sender.failure_reason or "")
        assert_released([stage])
    finally:
        stage.close()


def test_transfer_timeout_fails_a_write_to_a_frozen_peer_then_releases_on_return(
    shape: CacheShape,
) -> None:
    config = TransportConfig(transfer_timeout_s=0.5, liveness_interval_s=60)
    big = CacheShape(num_pages=512, page_size=64, num_kv_heads=8, head_dim=64)  # 64 MiB a side
    decode = DecodePeer(big)
    (stage,) = make_stages(big, [0, 4], config)
    try:
        info = decode.receive("slow", 1, list(range(512)), num_stages=1)
        sender = stage.sender("slow", 1)
        sender.set_receiver_info(info)
        decode.pause()  # SIGSTOP: the socket stays open but nothing reads it
        sender.send(list(range(512)), FirstToken(1, 1, 0.0, 1))
        assert wait_done(sender, timeout=10) is KVPoll.Failed
        assert "transfer timeout" in (sender.failure_reason or "")
        assert sender.in_flight  # Mooncake still holds our pages: they must not be reused yet
        decode.resume()
        deadline = time.monotonic() + 30
        while sender.in_flight:
            assert time.monotonic() < deadline, "write never returned"
            time.sleep(0.05)
        assert sender.poll() is KVPoll.Failed  # a late completion does not revive it
        assert_released([stage])
    finally:
        decode.resume()
        decode.stop()
        stage.close()


def test_peer_killed_while_waiting_fails_the_sender_within_the_liveness_bound(
    shape: CacheShape,
) -> None:
    config = TransportConfig(liveness_interval_s=0.2)
    decode = DecodePeer(shape)
    (stage,) = make_stages(shape, [0, 4], config)
    try:
        info = decode.receive("w", 1, [0, 1], num_stages=1)
        sender = stage.sender("w", 1)
        sender.set_receiver_info(info)
        decode.kill()
        start = time.monotonic()
        assert wait_done(sender, timeout=5) is KVPoll.Failed
        assert time.monotonic() - start < 2.0
        assert "unreachable" in (sender.failure_reason or "")
        assert_released([stage])
        # A later transfer to a live peer works on the same endpoint.
        fresh = DecodePeer(shape)
        try:
            info = fresh.receive("w2", 2, [5, 6], num_stages=1)
            again = stage.sender("w2", 2)
            again.set_receiver_info(info)
            again.send([0, 1], FirstToken(2, 3, 0.0, 8))
            assert wait_done(again) is KVPoll.Success, again.failure_reason
        finally:
            fresh.stop()
    finally:
        stage.close()


def test_peer_killed_mid_transfer_fails_the_write(shape: CacheShape) -> None:
    big = CacheShape(num_pages=512, page_size=64, num_kv_heads=8, head_dim=64)
    decode = DecodePeer(big)
    (stage,) = make_stages(big, [0, 4], TransportConfig(liveness_interval_s=60))
    try:
        info = decode.receive("m", 1, list(range(512)), num_stages=1)
        sender = stage.sender("m", 1)
        sender.set_receiver_info(info)
        decode.pause()  # hold the write open, then kill the peer under it
        sender.send(list(range(512)), FirstToken(1, 1, 0.0, 1))
        wait_for(sender, {KVPoll.Transferring})
        time.sleep(0.1)
        decode.kill()
        assert wait_done(sender, timeout=10) is KVPoll.Failed
        assert "failed" in (sender.failure_reason or "")
        assert_released([stage])
    finally:
        decode.stop()
        stage.close()


def test_abort_from_every_state_is_idempotent_and_releases_everything(
    stages: list[PrefillStage], decode: DecodePeer
) -> None:
    stage = stages[1]  # the last stage: it also holds a metadata slot while writing
    boot = stage.sender("a0", 1)
    waiting = stage.sender("a1", 2)
    waiting.set_receiver_info(decode.receive("a1", 2, [1], 2).for_layers(2, 4))
    done = stage.sender("a2", 3)
    done.set_receiver_info(decode.receive("a2", 3, [2], 2).for_layers(2, 4))
    done.send([0], FirstToken(3, 1, 0.0, 1))
    assert wait_done(done) is KVPoll.Success
    failed = stage.sender("a3", 4)
    failed.set_receiver_info(decode.receive("a3", 4, [64], 2))  # outside: fails
    moving = stage.sender("a4", 5)
    moving.set_receiver_info(decode.receive("a4", 5, [3], 2).for_layers(2, 4))
    moving.send([0], FirstToken(5, 1, 0.0, 1))
    for sender in (boot, waiting, done, failed, moving):
        sender.abort()
        sender.abort()
    assert boot.poll() is KVPoll.Failed and boot.failure_reason == "aborted"
    assert waiting.poll() is KVPoll.Failed and waiting.failure_reason == "aborted"
    assert done.poll() is KVPoll.Success  # finished work is not undone
    assert failed.poll() is KVPoll.Failed and "outside" in (failed.failure_reason or "")
    assert wait_done(moving) in (KVPoll.Failed, KVPoll.Success)
    while moving.in_flight:
        time.sleep(0.01)
    assert_released(stages)
    with pytest.raises(IllegalTransition):
        stage.sender("a5", 6).send([0], FirstToken(6, 1, 0.0, 1))  # never bootstrapped


def test_receiver_fails_on_a_stage_failure_and_releases_its_slot(decode: DecodePeer) -> None:
    decode.receive("f", 1, [0], num_stages=2)
    decode.result("f", 0, True)
    state, _, _ = decode.poll("f")
    assert KVPoll(state) is KVPoll.Transferring
    decode.result("f", 1, False, "KV write failed (rc=-1)")
    state, reason, first = decode.poll("f")
    assert KVPoll(state) is KVPoll.Failed and "stage 1" in reason and first is None
    decode.abort("f")
    assert decode.slots_held() == 0


def test_receiver_without_the_first_token_record_fails(decode: DecodePeer) -> None:
    decode.receive("nometa", 1, [0], num_stages=1)
    decode.result("nometa", 0, True)  # a stage claims success but wrote nothing
    state, reason, _ = decode.poll("nometa")
    assert KVPoll(state) is KVPoll.Failed and "first-token" in reason


def test_receiver_times_out_and_notices_a_dead_prefill_peer() -> None:
    from engine.kv_cache import PagedKVCache
    from transport import KVReceiver, TransferEndpoint

    shape = CacheShape()
    endpoint = TransferEndpoint(TransportConfig(receive_timeout_s=1.5, liveness_interval_s=0.1))
    cache = PagedKVCache(shape.spec(), 0, shape.num_layers)
    prefill = DecodePeer(shape)  # any live endpoint stands in for a prefill stage
    try:

        def receiver(rid: str) -> KVReceiver:
            r = KVReceiver(
                endpoint,
                rid=rid,
                room=1,
                regions=cache.regions(),
                layout=shape.layout(),
                page_indices=[0],
                num_stages=1,
            )
            r.publish()
            return r

        slow = receiver("slow")
        time.sleep(1.6)
        assert slow.poll() is KVPoll.Failed and "receive timeout" in (slow.failure_reason or "")
        assert slow.writes_may_land  # the stage never reported: it might still be writing
        slow.release()

        orphan = receiver("orphan")
        orphan.watch_stage(0, prefill.session_id)
        time.sleep(0.3)  # a few probes answered
        assert orphan.poll() is KVPoll.WaitingForInput
        prefill.kill()
        deadline = time.monotonic() + 1.0  # before the receive timeout could fire
        while orphan.poll() is not KVPoll.Failed:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert "unreachable" in (orphan.failure_reason or "")
        orphan.abort()
        orphan.abort()
        assert endpoint.metadata.num_held == 0
        assert not endpoint.liveness.watched
    finally:
        prefill.stop()
        endpoint.close()


def test_layout_from_a_real_cache_matches_its_region_strides() -> None:
    shape = CacheShape(dtype="bfloat16")
    from engine.kv_cache import PagedKVCache

    cache = PagedKVCache(shape.spec(), 0, 2)
    layout = KVLayout.from_spec(shape.spec(), 2)
    address = LayerAddress.from_region(cache.regions()[1])
    assert layout.dtype == "bfloat16"
    assert address.page_stride == layout.page_nbytes == 4 * 2 * 8 * 2
    assert address.kv_stride == shape.num_pages * layout.page_nbytes
    assert cache.layers[1].data_ptr() == address.base
    assert torch.bfloat16 == getattr(torch, layout.dtype)
