"""Attention over paged KV: per-step metadata and the attention call for prefill and decode.

A step is either all-prefill (chunks of prompts, each possibly appending to pages it already
holds) or all-decode (one new token per request). The metadata is built once per step from page
tables and shared by every layer; it holds flat slot indices into a layer's
`[num_pages * page_size, heads, dim]` view of K and V.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import accumulate

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SeqChunk:
    """One request's part of a step: `num_new` tokens at positions `[start, start + num_new)`."""

    start: int
    num_new: int
    pages: Sequence[int]
    wants_logits: bool = True


@dataclass
class AttentionMetadata:
    positions: torch.Tensor  # [T] absolute positions of the step's tokens
    slot_mapping: torch.Tensor  # [T] where each new token's K/V is written
    is_decode: bool
    query_lens: list[int]
    prefix_lens: list[int]
    prefix_slots: list[torch.Tensor | None]  # prefill: slots of [0, start + n) when start > 0
    decode_slots: torch.Tensor | None  # decode: [B, max_len] slots (padding masked)
    decode_mask: torch.Tensor | None  # decode: [B, 1, 1, max_len] True where attended
    logits_indices: torch.Tensor  # [R] token rows whose logits the last stage returns
    _decode_bias: torch.Tensor | None = field(default=None, repr=False)

    def decode_bias(self, dtype: torch.dtype) -> torch.Tensor:
        """Additive mask (0 or -inf) for decode scores, built once per step for all layers."""
        if self._decode_bias is None or self._decode_bias.dtype != dtype:
            assert self.decode_mask is not None
            bias = torch.zeros(self.decode_mask.shape, dtype=dtype, device=self.decode_mask.device)
            self._decode_bias = bias.masked_fill_(~self.decode_mask, float("-inf"))
        return self._decode_bias

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])

    @classmethod
    def build(
        cls,
        chunks: Sequence[SeqChunk],
        page_size: int,
        device: torch.device | str = "cpu",
        all_logits: bool = False,
    ) -> AttentionMetadata:
        """`all_logits` asks for every token's logits (reference checks, prompt logprobs)."""
        if not chunks:
            raise ValueError("a step needs at least one request")
        is_decode = all(c.num_new == 1 and c.start > 0 for c in chunks)
        max_pages = max(len(c.pages) for c in chunks)
        # One tensor built from Python lists: per-chunk tensor ops dominate small decode steps.
        table = torch.tensor([[*c.pages] + [0] * (max_pages - len(c.pages)) for c in chunks])
        query_lens = [c.num_new for c in chunks]
        prefix_lens = [c.start for c in chunks]
        if is_decode:
            positions = torch.tensor(prefix_lens)
            row = torch.arange(len(chunks))
        else:
            positions = torch.cat([torch.arange(c.start, c.start + c.num_new) for c in chunks])
            row = torch.repeat_interleave(torch.arange(len(chunks)), torch.tensor(query_lens))
        slot_mapping = table[row, positions // page_size] * page_size + positions % page_size
        if all_logits:
            logits_indices = torch.arange(int(positions.shape[0]))
        else:
            ends = list(accumulate(query_lens))
            logits_indices = torch.tensor(
                [e - 1 for e, c in zip(ends, chunks, strict=True) if c.wants_logits],
                dtype=torch.int64,
            )

        prefix_slots: list[torch.Tensor | None] = []
        decode_slots = decode_mask = None
        if is_decode:
            kv_lens = torch.tensor([c.start + 1 for c in chunks])
            span = torch.arange(int(kv_lens.max()))
            decode_slots = table[:, span // page_size] * page_size + span % page_size
            decode_mask = (span[None, :] < kv_lens[:, None])[:, None, None, :]
            decode_slots, decode_mask = decode_slots.to(device), decode_mask.to(device)
        else:
            for i, c in enumerate(chunks):
                if c.start == 0:
                    prefix_slots.append(None)
                    continue
                span = torch.arange(c.start + c.num_new)
                slots = table[i, span // page_size] * page_size + span % page_size
                prefix_slots.append(slots.to(device))
        return cls(
            positions=positions.to(device),
            slot_mapping=slot_mapping.to(device),
            is_decode=is_decode,
            query_lens=query_lens,
            prefix_lens=prefix_lens,
            prefix_slots=prefix_slots,
            decode_slots=decode_slots,
            decode_mask=decode_mask,
            logits_indices=logits_indices.to(device),
        )


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
) -> torch.Tensor:
    """Write the step's K/V into the cache, then attend. q: [T, H, D]; k, v: [T, Hkv, D]."""
    k_cache.index_copy_(0, meta.slot_mapping, k)
    v_cache.index_copy_(0, meta.slot_mapping, v)
    if meta.is_decode:
        return _decode(q, k_cache, v_cache, meta)
    return _prefill(q, k, v, k_cache, v_cache, meta)


def _decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata):
    assert meta.decode_slots is not None and meta.decode_mask is not None
    batch, span = meta.decode_slots.shape
    heads, kv_heads, dim = q.shape[1], k_cache.shape[1], q.shape[2]
    # index_select on flat slots is several times faster than advanced indexing on CPU.
    flat = meta.decode_slots.view(-1)
    keys = k_cache.index_select(0, flat).view(batch, span, kv_heads, dim).transpose(1, 2)
    values = v_cache.index_select(0, flat).view(batch, span, kv_heads, dim).transpose(1, 2)
    if q.is_cuda:
        out = F.scaled_dot_product_attention(
            q.unsqueeze(2), keys, values, attn_mask=meta.decode_mask, enable_gqa=True
        )
        return out.squeeze(2)
    # On CPU two batched matmuls beat SDPA for one query row: each KV head serves its group
    # of query heads in a single [group, dim] x [dim, span] product.
    grouped = q.view(batch, kv_heads, heads // kv_heads, dim)
    scores = torch.matmul(grouped, keys.transpose(-1, -2)).float() * dim**-0.5
    probs = torch.softmax(scores + meta.decode_bias(torch.float32), dim=-1).to(q.dtype)
    return torch.matmul(probs, values).view(batch, heads, dim)


def _prefill(q, k, v, k_cache, v_cache, meta: AttentionMetadata) -> torch.Tensor:
    outs = []
    offset = 0
    for n, prefix, slots in zip(meta.query_lens, meta.prefix_lens, meta.prefix_slots, strict=True):
        qi = q[offset : offset + n].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
        if slots is None:
            ki = k[offset : offset + n].transpose(0, 1).unsqueeze(0)
            vi = v[offset : offset + n].transpose(0, 1).unsqueeze(0)
            oi = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, enable_gqa=True)
        else:
            ki = k_cache.index_select(0, slots).transpose(0, 1).unsqueeze(0)  # [1, Hkv, ctx, D]
            vi = v_cache.index_select(0, slots).transpose(0, 1).unsqueeze(0)
            kv_pos = torch.arange(prefix + n, device=q.device)
            q_pos = torch.arange(prefix, prefix + n, device=q.device)
            mask = kv_pos[None, :] <= q_pos[:, None]
            oi = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, enable_gqa=True)
        outs.append(oi.squeeze(0).transpose(0, 1))
        offset += n
    return torch.cat(outs, dim=0)
