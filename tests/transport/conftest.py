"""Fixtures for transport tests: a decode peer process and prefill stages in this process."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

# Mooncake logs every connection through glog; keep warnings and errors only.
os.environ.setdefault("GLOG_minloglevel", "1")

import itertools

from tests.transport.peer import CacheShape, DecodePeer, PrefillStage
from transport import TransportConfig


def make_stages(
    shape: CacheShape, splits: list[int], config: TransportConfig | None = None
) -> list[PrefillStage]:
    """Stages holding layers `[splits[i], splits[i+1])`."""
    config = config or TransportConfig()
    return [PrefillStage(shape, config, range(a, b)) for a, b in itertools.pairwise(splits)]


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
