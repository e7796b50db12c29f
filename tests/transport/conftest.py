"""Fixtures for transport tests: a decode peer process and prefill stages in this process."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

# Mooncake logs every connection through glog; keep warnings and errors only.
os.environ.setdefault("GLOG_minloglevel", "1")

import itertools

from engine.kv_cache import PagedKVCache
from tests.transport.peer import CacheShape, DecodePeer
from transport import KVSender, TransferEndpoint, TransportConfig


class PrefillStage:
    """One prefill stage's transport: its endpoint and a KV cache of random bytes."""

    def __init__(
        self, shape: CacheShape, layers: range, num_layers_total: int, config: TransportConfig
    ) -> None:
        self.shape = shape
        self.layers = layers
        self.is_last = layers.stop == num_layers_total
        self.endpoint = TransferEndpoint(config)
        self.cache = PagedKVCache(shape.spec(), first_layer=layers.start, num_layers=len(layers))
        gen = torch.Generator().manual_seed(layers.start)
        for layer in self.cache.layers:
            layer.copy_(torch.randn(layer.shape, generator=gen))
        self.endpoint.register_cache(self.cache)

    def sender(self, rid: str, room: int, pp_rank: int = 0) -> KVSender:
        return KVSender(
            self.endpoint,
            rid=rid,
            room=room,
            regions=self.cache.regions(),
            layout=self.shape.layout(),
            is_last_stage=self.is_last,
            pp_rank=pp_rank,
        )

    def close(self) -> None:
        self.endpoint.close()


def make_stages(
    shape: CacheShape, splits: list[int], config: TransportConfig | None = None
) -> list[PrefillStage]:
    """Stages holding layers `[splits[i], splits[i+1])`."""
    config = config or TransportConfig()
    return [
        PrefillStage(shape, range(a, b), shape.num_layers, config)
        for a, b in itertools.pairwise(splits)
    ]


@pytest.fixture
def shape() -> CacheShape:
    return CacheShape()


@pytest.fixture(scope="module")
def shared_decode() -> Iterator[DecodePeer]:
    peer = DecodePeer(CacheShape())
    yield peer
    peer.stop()


@pytest.fixture
def decode(shared_decode: DecodePeer) -> DecodePeer:
    """The module's decode process, reset to a clean cache (starting one costs seconds)."""
    shared_decode.reset()
    return shared_decode


@pytest.fixture(scope="module")
def shared_stages() -> Iterator[list[PrefillStage]]:
    made = make_stages(CacheShape(), [0, 2, 4])
    yield made
    for stage in made:
        stage.close()


@pytest.fixture
def stages(shared_stages: list[PrefillStage]) -> list[PrefillStage]:
    return shared_stages
