"""Test-side helpers for running stages over fresh KV caches."""

from __future__ import annotations

import torch

from engine import KVCacheSpec, PagedKVCache, SeqChunk, StageRunner
from engine.model import DecoderStage


def full_logits(
    stages: list[DecoderStage], token_ids: torch.Tensor, page_size: int = 16
) -> torch.Tensor:
    """Logits of every position of one prompt pushed through `stages` in order."""
    n = int(token_ids.shape[0])
    num_pages = -(-n // page_size) + 1
    # Pages in reverse order, so the page table is really used rather than the identity.
    pages = list(range(num_pages))[::-1]
    h = token_ids
    for stage in stages:
        cfg = stage.config
        spec = KVCacheSpec(
            num_pages, page_size, cfg.num_key_value_heads, cfg.head_dim, torch.float32
        )
        runner = StageRunner(stage, PagedKVCache(spec, stage.layer_range.start, len(stage.layers)))
        h = runner.forward([SeqChunk(0, n, pages)], h, all_logits=True)
    return h
