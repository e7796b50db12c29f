"""CPU decode through the dense KV mirror equals decode through the per-layer page gather, as
the batch grows past the mirror's capacity, loses and gains requests, after a prefill, and when
a request whose KV arrived from elsewhere (PD) takes a leaving request's row and position."""

from __future__ import annotations

import random

import torch

from engine import SeqChunk, load_stage
from engine.kv_cache import KVCacheSpec, PagedKVCache
from engine.runner import StageRunner


def runners(stage) -> tuple[StageRunner, StageRunner]:
    """A runner and a second one on the same cache, which writes KV as the transport would:
    without the first runner seeing a step."""
    cfg = stage.config
    spec = KVCacheSpec(256, 4, cfg.num_key_value_heads, cfg.head_dim, torch.float32)
    cache = PagedKVCache(spec, 0, cfg.num_hidden_layers)
    return StageRunner(stage, cache), StageRunner(stage, cache)


def test_mirror_decode_equals_gather_decode_across_batch_changes(llama_dir):
    stage = load_stage(llama_dir)
    (mirrored, mirrored_peer), (gathered, gathered_peer) = runners(stage), runners(stage)
    gathered.decode_mirror = None
    rng = random.Random(0)
    pages = rng.sample(range(256), 256)
    tables = [pages[i * 32 : (i + 1) * 32] for i in range(8)]  # 128 tokens of room each
    lengths = [0] * 8

    def step(chunks, ids):
        ids = torch.tensor(ids)
        a, b = mirrored.forward(chunks, ids), gathered.forward(chunks, ids)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

    def prefill(rows, length=None, elsewhere=False):
        chunks = []
        for j in rows:
            lengths[j] = length or rng.randrange(3, 20)
            chunks.append(SeqChunk(0, lengths[j], tables[j]))
        ids = torch.tensor([rng.randrange(5, 600) for _ in range(sum(lengths[j] for j in rows))])
        if elsewhere:
            mirrored_peer.forward(chunks, ids)
            gathered_peer.forward(chunks, ids)
        else:
            step(chunks, ids.tolist())

    def decode(rows, steps):
        for _ in range(steps):
            step([SeqChunk(lengths[j], 1, tables[j]) for j in rows], [7] * len(rows))
            for j in rows:
                lengths[j] += 1

    prefill([0, 1, 2])
    decode([0, 1, 2], 20)  # grows past 16 and 32 tokens of capacity
    decode([0, 2], 3)  # a request left
    prefill([3])
    decode([0, 2, 3], 4)  # a request joined after a prefill step
    decode([3, 0, 2], 2)  # same requests, new order
    tables[1] = list(tables[1])  # same pages, new list: a recomputed request is a new row
    lengths[1] = 0
    prefill([1])
    decode([0, 1, 2, 3], 5)
    while max(lengths[0], lengths[2]) % 16:
        decode([0, 2], 1)
    decode([0, 2], 1)  # the mirror grows: room for the next steps without a rebuild
    # Request 4's KV is written behind the runner's back; it takes request 2's row, one
    # position further on, as if request 2 had gone on: only its page list tells them apart.
    prefill([4], length=lengths[2], elsewhere=True)
    decode([0, 4], 3)
    assert mirrored.decode_mirror is not None and mirrored.decode_mirror._layers
