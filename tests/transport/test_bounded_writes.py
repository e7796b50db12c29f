"""A request's KV reaches Mooncake in bounded batches, in order, with the first-token record last.

Mooncake's tcp transport queues about 2050 segments per peer; a scattered max-length prompt
(one segment per page, layer and K/V) is many more, and one batch of them fails (NOTES.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.transport.conftest import make_stages
from tests.transport.peer import CacheShape, DecodePeer
from tests.transport.test_transfer import assert_pages_arrived, transfer
from transport import FirstToken, KVPoll, TransportConfig
from transport.metadata import SLOT_NBYTES

BIG = CacheShape(num_pages=1024)  # 256-byte pages: 4096 scattered segments are 1 MiB


class RecordingEngine:
    """The endpoint's Mooncake engine, recording the destinations of each batch write."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.batches: list[list[int]] = []

    def batch_transfer_sync_write(
        self, session: str, srcs: list[int], dsts: list[int], lengths: list[int]
    ) -> int:
        self.batches.append(list(dsts))
        return self.engine.batch_transfer_sync_write(session, srcs, dsts, lengths)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)


@pytest.fixture(scope="module")
def big_decode() -> Iterator[DecodePeer]:
    peer = DecodePeer(BIG)
    yield peer
    peer.stop()


@pytest.fixture
def decode_1024(big_decode: DecodePeer) -> DecodePeer:
    big_decode.reset()
    return big_decode


def test_a_write_of_more_segments_than_one_batch_allows_lands_in_order(
    decode: DecodePeer, shape: CacheShape, monkeypatch: pytest.MonkeyPatch
) -> None:
    (stage,) = make_stages(shape, [0, 4], TransportConfig(max_segments_per_write=8))
    try:
        recorder = RecordingEngine(stage.endpoint._engine)
        monkeypatch.setattr(stage.endpoint, "_engine", recorder)
        # Every other page on both sides: each page is a run of its own.
        local, remote = list(range(0, 12, 2)), list(range(1, 13, 2))
        token = FirstToken(room=3, token_id=5, logprob=-0.25, num_prompt_tokens=24)
        (sender,) = transfer([stage], decode, "many", 3, [local], remote, token)
        assert sender.poll() is KVPoll.Success, sender.failure_reason
        state, reason, first = decode.poll("many")
        assert KVPoll(state) is KVPoll.Success, reason
        assert first == token
        segments = 4 * 2 * len(local) + 1  # layers x (K, V) x pages, and the record
        assert sender.stats.segments == segments  # stats count the request, not its batches
        assert sender.stats.nbytes == (segments - 1) * shape.layout().page_nbytes + SLOT_NBYTES
        assert [len(b) for b in recorder.batches] == [8] * 6 + [1]
        written = [dst for batch in recorder.batches for dst in batch]
        info = sender.receiver_info
        assert written[-1] == info.metadata.address  # the record in the last batch, last
        by_layer = {a.layer: a for a in info.layers}
        expected = [
            by_layer[layer].base
            + kv * by_layer[layer].kv_stride
            + page * by_layer[layer].page_stride
            for layer in range(4)
            for kv in (0, 1)
            for page in remote
        ]
        assert written[:-1] == expected  # in the order the request listed them
        assert_pages_arrived([stage], decode, [([local], remote)])
    finally:
        stage.close()


def test_a_scattered_prompt_beyond_what_one_tcp_batch_takes_lands_with_the_default_config(
    decode_1024: DecodePeer,
) -> None:
    (stage,) = make_stages(BIG, [0, 4])
    try:
        local, remote = list(range(0, 1024, 2)), list(range(1, 1024, 2))
        token = FirstToken(room=4, token_id=9, logprob=-1.5, num_prompt_tokens=2048)
        (sender,) = transfer([stage], decode_1024, "long", 4, [local], remote, token)
        assert sender.poll() is KVPoll.Success, sender.failure_reason
        assert sender.stats.segments == 4 * 2 * 512 + 1  # twice what Mooncake takes at once
        state, reason, first = decode_1024.poll("long")
        assert KVPoll(state) is KVPoll.Success, reason
        assert first == token
        assert_pages_arrived([stage], decode_1024, [([local], remote)])
        assert stage.endpoint.repairs == 0
    finally:
        stage.close()


def test_writes_are_bounded_by_default_below_the_tcp_queue_of_one_peer() -> None:
    assert 0 < TransportConfig().max_segments_per_write <= 1024
    with pytest.raises(ValueError):
        TransportConfig(max_segments_per_write=0)
