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
    _decode_gather: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)
    _decode_bias: dict[tuple[int, torch.dtype], torch.Tensor] = field(
        default_factory=dict, repr=False
    )

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])

    def decode_gather_index(self, kv_heads: int) -> torch.Tensor:
        """Rows of a `[slots * kv_heads, dim]` cache view in `[B, kv_heads, max_len]` order.

        Gathering head-major puts each sequence's keys of one head side by side, which is the
        layout the decode matmuls want: one gather per layer and no transposing copy after it.
        Built on first use and shared by every layer of the step.
        """
        index = self._decode_gather.get(kv_heads)
        if index is None:
            assert self.decode_slots is not None
            heads = torch.arange(kv_heads, device=self.decode_slots.device)
            index = (self.decode_slots[:, None, :] * kv_heads + heads[None, :, None]).view(-1)
            self._decode_gather[kv_heads] = index
        return index

    def decode_bias(self, kv_heads: int, dtype: torch.dtype) -> torch.Tensor:
        """Additive mask (0 or -inf) `[B * kv_heads, 1, max_len]` for the batched score matmul."""
        key = (kv_heads, dtype)
        bias = self._decode_bias.get(key)
        if bias is None:
            assert self.decode_mask is not None
            batch, span = self.decode_mask.shape[0], self.decode_mask.shape[-1]
            mask = self.decode_mask.view(batch, 1, span).expand(batch, kv_heads, span)
            bias = torch.where(mask, 0.0, float("-inf")).to(dtype)
            bias = bias.view(batch * kv_heads, 1, span)
            self._decode_bias[key] = bias
        return bias

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
        if all(c.num_new == 1 and c.start > 0 for c in chunks):
            return cls._build_decode(chunks, page_size, torch.device(device))
        return cls._build_prefill(chunks, page_size, torch.device(device), all_logits)

    @classmethod
    def _build_decode(
        cls, chunks: Sequence[SeqChunk], page_size: int, device: torch.device
    ) -> AttentionMetadata:
        """One new token per request. Slots come from Python ints and a single page table
        tensor: at decode sizes per-request tensor ops would cost more than the model."""
        starts = [c.start for c in chunks]
        span = max(starts) + 1
        num_pages = -(-span // page_size)
        rows = []
        for c in chunks:
            pages = list(c.pages[:num_pages])
            rows.append(pages + [0] * (num_pages - len(pages)))
        table = torch.tensor(rows, dtype=torch.int64)
        positions = torch.tensor(starts, dtype=torch.int64)
        slots = [
            c.pages[s // page_size] * page_size + s % page_size
            for c, s in zip(chunks, starts, strict=True)
        ]
        slot_mapping = torch.tensor(slots, dtype=torch.int64)
        offsets = torch.arange(page_size)
        decode_slots = (table[:, :, None] * page_size + offsets).view(len(chunks), -1)[:, :span]
        decode_mask = (torch.arange(span)[None, :] <= positions[:, None])[:, None, None, :]
        batch = len(chunks)
        return cls(
            positions=positions.to(device),
            slot_mapping=slot_mapping.to(device),
            is_decode=True,
            query_lens=[1] * batch,
            prefix_lens=starts,
            prefix_slots=[],
            decode_slots=decode_slots.to(device),
            decode_mask=decode_mask.to(device),
            # Every row wants logits: the model skips the row gather when R == T.
            logits_indices=torch.arange(batch, device=device),
        )

    @classmethod
    def _build_prefill(
        cls,
        chunks: Sequence[SeqChunk],
        page_size: int,
        device: torch.device,
        all_logits: bool,
    ) -> AttentionMetadata:
        max_pages = max(len(c.pages) for c in chunks)
        table = torch.tensor([[*c.pages] + [0] * (max_pages - len(c.pages)) for c in chunks])
        query_lens = [c.num_new for c in chunks]
        prefix_lens = [c.start for c in chunks]
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
            is_decode=False,
            query_lens=query_lens,
            prefix_lens=prefix_lens,
            prefix_slots=prefix_slots,
            decode_slots=None,
            decode_mask=None,
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
    """One query row per request against its pages, gathered head-major in one op per K/V."""
    batch, dim = q.shape[0], q.shape[2]
    kv_heads = k_cache.shape[1]
    index = meta.decode_gather_index(kv_heads)
    span = index.shape[0] // (batch * kv_heads)
    # index_select on flat rows is several times faster than advanced indexing on CPU.
    keys = k_cache.view(-1, dim).index_select(0, index).view(batch * kv_heads, span, dim)
    values = v_cache.view(-1, dim).index_select(0, index).view(batch * kv_heads, span, dim)
    if q.is_cuda:
        out = F.scaled_dot_product_attention(
            q.unsqueeze(2),
            keys.view(batch, kv_heads, span, dim),
            values.view(batch, kv_heads, span, dim),
            attn_mask=meta.decode_mask,
            enable_gqa=True,
        )
        return out.squeeze(2)
    return _decode_cpu(q, keys, values, meta)


def _decode_cpu(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, meta: AttentionMetadata
) -> torch.Tensor:
    """Two batched matmuls, which beat SDPA for one query row on CPU: each KV head serves its
    group of query heads in a single [group, dim] x [dim, span] product, the mask and scale
    folded into the first (baddbmm)."""
    batch, heads, dim = q.shape
    rows = keys.shape[0]  # batch * kv_heads
    dtype = q.dtype
    if dtype != torch.float32:  # scores and softmax in float32, as the reference does
        q, keys, values = q.float(), keys.float(), values.float()
    bias = meta.decode_bias(rows // batch, torch.float32)
    grouped = q.reshape(rows, heads * batch // rows, dim)
    scores = torch.baddbmm(bias, grouped, keys.transpose(1, 2), alpha=dim**-0.5)
    out = torch.bmm(torch.softmax(scores, dim=-1), values)
    return out.view(batch, heads, dim).to(dtype)


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
