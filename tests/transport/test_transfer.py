"""KV moves byte-exact from prefill stages into a decode process over Mooncake tcp."""

from __future__ import annotations

import random
import time

import pytest
import torch

from tests.transport.conftest import make_stages
from tests.transport.peer import FILL, CacheShape, DecodePeer, PrefillStage
from transport import FirstToken, KVPoll, KVSender, MetadataSlotsExhausted
from transport.endpoint import MooncakeMover


def wait_for(sender: KVSender, states: set[KVPoll], timeout: float = 10.0) -> KVPoll:
    deadline = time.monotonic() + timeout
    while (state := sender.poll()) not in states:
        assert time.monotonic() < deadline, f"{sender.rid} stuck in {state.name}"
        time.sleep(0.005)
    return state


def wait_done(sender: KVSender, timeout: float = 10.0) -> KVPoll:
    return wait_for(sender, {KVPoll.Success, KVPoll.Failed}, timeout)


def transfer(
    stages: list[PrefillStage],
    decode: DecodePeer,
    rid: str,
    room: int,
    local_pages: list[list[int]],
    remote_pages: list[int],
    token: FirstToken,
) -> list[KVSender]:
    """Run one request's full transfer through every stage and report the results."""
    info = decode.receive(rid, room, remote_pages, num_stages=len(stages))
    senders = [stage.sender(rid, room, pp_rank=i) for i, stage in enumerate(stages)]
    for stage, sender in zip(stages, senders, strict=True):
        assert sender.poll() is KVPoll.Bootstrapping
        sender.set_receiver_info(info.for_layers(stage.layers.start, stage.layers.stop))
        assert sender.poll() is KVPoll.WaitingForInput, sender.failure_reason
    for i, sender in enumerate(senders):
        sender.send(local_pages[i], token if stages[i].is_last else None)
    for i, sender in enumerate(senders):
        state = wait_done(sender)
        decode.result(rid, i, state is KVPoll.Success, sender.failure_reason)
    return senders


def assert_pages_arrived(
    stages: list[PrefillStage],
    decode: DecodePeer,
    requests: list[tuple[list[list[int]], list[int]]],
) -> None:
    """Addressed decode pages equal their prefill source; every other page is untouched."""
    got = decode.layers()
    shape = stages[0].shape
    written: set[int] = set()
    for local_pages, remote_pages in requests:
        written.update(remote_pages)
        for stage_index, stage in enumerate(stages):
            for local_layer, layer in enumerate(stage.layers):
                src = stage.cache.layers[local_layer].view(torch.uint8)
                for lp, rp in zip(local_pages[stage_index], remote_pages, strict=True):
                    for kv in (0, 1):
                        assert torch.equal(got[layer][kv, rp], src[kv, lp]), (layer, kv, lp, rp)
    untouched = [p for p in range(shape.num_pages) if p not in written]
    for layer in got:
        assert bool((layer[:, untouched] == FILL).all())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_page_tables_arrive_byte_exact_and_leave_other_pages_untouched(
    seed: int, stages: list[PrefillStage], decode: DecodePeer
) -> None:
    rng = random.Random(seed)
    num_pages = stages[0].shape.num_pages
    remote_free = list(range(num_pages))
    rng.shuffle(remote_free)
    requests = []
    for n, num_req_pages in enumerate([5, 1, 9]):
        # Decode pages: partly consecutive runs, partly scattered, like a real allocator's.
        remote = sorted(remote_free[:num_req_pages]) if n % 2 else remote_free[:num_req_pages]
        del remote_free[:num_req_pages]
        local = [rng.sample(range(num_pages), num_req_pages) for _ in stages]
        token = FirstToken(room=100 + n, token_id=7 + n, logprob=-0.5, num_prompt_tokens=4 * n)
        senders = transfer(stages, decode, f"r{n}", 100 + n, local, remote, token)
        assert [s.poll() for s in senders] == [KVPoll.Success] * len(stages)
        state, reason, first = decode.poll(f"r{n}")
        assert KVPoll(state) is KVPoll.Success, reason
        assert first == token
        requests.append((local, remote))
    assert_pages_arrived(stages, decode, requests)
    assert decode.slots_held() == 0
    assert all(stage.endpoint.metadata.num_held == 0 for stage in stages)
    assert all(not stage.endpoint.liveness.watched for stage in stages)


def test_consecutive_pages_coalesce_into_one_segment_per_layer_and_kv(
    stages: list[PrefillStage], decode: DecodePeer
) -> None:
    token = FirstToken(room=1, token_id=3, logprob=0.0, num_prompt_tokens=32)
    local = [list(range(10, 18)) for _ in stages]
    senders = transfer(stages, decode, "run", 1, local, list(range(40, 48)), token)
    first, last = senders
    assert first.stats.segments == 2 * 2  # 2 layers x (K, V)
    assert last.stats.segments == 2 * 2 + 1  # + the first-token record
    page = stages[0].shape.layout().page_nbytes
    assert first.stats.nbytes == 2 * 2 * 8 * page
    assert_pages_arrived(stages, decode, [(local, list(range(40, 48)))])


def test_four_stages_one_layer_each(decode: DecodePeer, shape: CacheShape) -> None:
    stages = make_stages(shape, [0, 1, 2, 3, 4])
    try:
        local = [[3, 4, 9] for _ in stages]
        token = FirstToken(room=9, token_id=1, logprob=-1.0, num_prompt_tokens=12)
        transfer(stages, decode, "pp4", 9, local, [0, 1, 2], token)
        assert KVPoll(decode.poll("pp4")[0]) is KVPoll.Success
        assert_pages_arrived(stages, decode, [(local, [0, 1, 2])])
    finally:
        for stage in stages:
            stage.close()


def test_the_last_stage_may_start_its_kv_before_sampling_its_first_token(
    stages: list[PrefillStage], decode: DecodePeer
) -> None:
    """A stage starts its sends once its forward is queued; the last stage's token comes after
    sampling. Over Mooncake the write (KV and record, one batch) starts with the token."""
    token = FirstToken(room=5, token_id=11, logprob=-0.75, num_prompt_tokens=12)
    local, remote = [[1, 2, 3] for _ in stages], [20, 21, 22]
    info = decode.receive("later", 5, remote, num_stages=len(stages))
    senders = [stage.sender("later", 5, pp_rank=i) for i, stage in enumerate(stages)]
    for stage, sender, pages in zip(stages, senders, local, strict=True):
        sender.set_receiver_info(info.for_layers(stage.layers.start, stage.layers.stop))
        sender.send(pages)
    last = senders[-1]
    assert isinstance(last.mover, MooncakeMover)
    assert last.mover.device is None  # CPU KV: no stream ticket (tests/gpu covers the GPU's)
    with pytest.raises(RuntimeError, match="waits for a first token"):
        senders[0].send_first_token(token)  # a middle stage never takes one
    time.sleep(0.05)
    assert last.poll() is KVPoll.Transferring and not last.in_flight  # nothing submitted yet
    assert stages[-1].endpoint.metadata.num_held == 0
    last.send_first_token(token)
    with pytest.raises(RuntimeError, match="waits for a first token"):
        last.send_first_token(token)  # exactly once
    for i, sender in enumerate(senders):
        assert wait_done(sender) is KVPoll.Success, sender.failure_reason
        decode.result("later", i, True)
    state, reason, first = decode.poll("later")
    assert KVPoll(state) is KVPoll.Success, reason
    assert first == token
    assert last.stats.segments == 2 * 2 + 1  # the record went in the same batch
    assert_pages_arrived(stages, decode, [(local, remote)])
    assert all(stage.endpoint.metadata.num_held == 0 for stage in stages)


def test_a_last_stage_aborted_before_its_token_submits_nothing(
    stages: list[PrefillStage], decode: DecodePeer
) -> None:
    info = decode.receive("dropped", 6, [30], num_stages=len(stages))
    sender = stages[-1].sender("dropped", 6, pp_rank=len(stages) - 1)
    sender.set_receiver_info(info.for_layers(stages[-1].layers.start, stages[-1].layers.stop))
    sender.send([4])
    sender.abort("dropped by consensus")
    sender.send_first_token(FirstToken(room=6, token_id=1, logprob=0.0, num_prompt_tokens=4))
    time.sleep(0.05)
    assert sender.poll() is KVPoll.Failed and sender.failure_reason == "dropped by consensus"
    assert not sender.in_flight and stages[-1].endpoint.metadata.num_held == 0
    decode.abort("dropped")
    assert all(bool((layer == FILL).all()) for layer in decode.layers())


def test_a_token_whose_record_cannot_get_a_slot_fails_only_that_request(
    stages: list[PrefillStage], decode: DecodePeer, monkeypatch: pytest.MonkeyPatch
) -> None:
    info = decode.receive("full", 8, [31], num_stages=len(stages))
    sender = stages[-1].sender("full", 8, pp_rank=len(stages) - 1)
    sender.set_receiver_info(info.for_layers(stages[-1].layers.start, stages[-1].layers.stop))
    sender.send([5])

    def exhausted() -> int:
        raise MetadataSlotsExhausted("every metadata slot is held")

    monkeypatch.setattr(stages[-1].endpoint.metadata, "acquire", exhausted)
    sender.send_first_token(FirstToken(room=8, token_id=1, logprob=0.0, num_prompt_tokens=4))
    assert sender.poll() is KVPoll.Failed and not sender.in_flight
    assert "every metadata slot is held" in (sender.failure_reason or "")
    decode.abort("full")
