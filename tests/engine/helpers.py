"""Test-side helpers for running stages over fresh KV caches."""

from __future__ import annotations

import torch

from engine import KVCacheSpec, PagedKVCache, SeqChunk, StageRunner
from engine.model import DecoderStage


def stage_dtype(stage: DecoderStage) -> torch.dtype:
    """The dtype a stage runs in (its KV cache's): that of its norms, which are never packed."""
    return stage.layers[0].input_layernorm.weight.dtype


def _runner(stage: DecoderStage, num_pages: int, page_size: int) -> StageRunner:
    cfg = stage.config
    spec = KVCacheSpec(
        num_pages, page_size, cfg.num_key_value_heads, cfg.head_dim, stage_dtype(stage)
    )
    return StageRunner(stage, PagedKVCache(spec, stage.layer_range.start, len(stage.layers)))


def full_logits(
    stages: list[DecoderStage], token_ids: torch.Tensor, page_size: int = 16
) -> torch.Tensor:
    """Logits of every position of one prompt pushed through `stages` in order (prefill)."""
    n = int(token_ids.shape[0])
    num_pages = -(-n // page_size) + 1
    # Pages in reverse order, so the page table is really used rather than the identity.
    pages = list(range(num_pages))[::-1]
    h = token_ids
    for stage in stages:
        runner = _runner(stage, num_pages, page_size)
        h = runner.forward([SeqChunk(0, n, pages)], h, all_logits=True)
    return h


def decode_logits(
    stage: DecoderStage, token_ids: torch.Tensor, prompt: int = 1, page_size: int = 16
) -> torch.Tensor:
    """Logits of every position from `prompt - 1` on, of a whole-model stage that prefills the
    first `prompt` tokens and then decodes the rest one step at a time (teacher-forced): the
    decode path's numbers, where `full_logits` gives prefill's."""
    n = int(token_ids.shape[0])
    num_pages = -(-n // page_size) + 1
    pages = list(range(num_pages))[::-1]
    runner = _runner(stage, num_pages, page_size)
    rows = [runner.forward([SeqChunk(0, prompt, pages)], token_ids[:prompt])]
    for i in range(prompt, n):
        rows.append(runner.forward([SeqChunk(i, 1, pages)], token_ids[i : i + 1]))
    return torch.cat(rows)
