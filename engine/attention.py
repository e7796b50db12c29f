"""Attention over paged KV: per-step metadata and the attention call for prefill and decode.

A step is either all-prefill (chunks of prompts, each possibly appending to pages it already
holds) or all-decode (one new token per request). The metadata is built once per step from page
tables, on the host, uploaded in one copy and shared by every layer; it holds flat slot indices
into a layer's `[num_pages * page_size, heads, dim]` view of K and V.

Decode reads KV in place, walking the page table: on CUDA in a Triton kernel (engine/kernels.py),
on the CPU in a native one that also applies rotary and writes the new K/V (engine/cpu_kernels.py;
without it, the pages are gathered per layer with torch ops).
Prefill attends with SDPA to the chunk's own K/V, or to the gathered prefix when the chunk
continues a prompt; on CUDA several fresh prompts go to one variable-length flash call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import accumulate, chain

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right


@dataclass(frozen=True)
class SeqChunk:
    """One request's part of a step: `num_new` tokens at positions `[start, start + num_new)`."""

    start: int
    num_new: int
    pages: Sequence[int]
    wants_logits: bool = True  # its last token's logits: a token is sampled after it
    all_logits: bool = False  # every token's logits (prompt logprobs)


def logits_rows(chunks: Sequence[SeqChunk]) -> list[range]:
    """Which rows of the last stage's logits belong to each chunk: all of its tokens'
    (`all_logits`), its last token's (`wants_logits`), or none. A sampled chunk's row is the
    last of its range."""
    rows, offset = [], 0
    for c in chunks:
        n = c.num_new if c.all_logits else int(c.wants_logits)
        rows.append(range(offset, offset + n))
        offset += n
    return rows


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
    cu_seqlens: torch.Tensor | None = None  # prefill: [requests + 1] int32 query offsets
    # Fresh prompts only (CUDA, half precision): attend with one variable-length flash call,
    # its longest query this (a captured prefill's token bucket).
    varlen_max: int | None = None
    # Decode read in place (CUDA; CPU with the native kernels): page ids [B, >= pages] and
    # context lengths [B] (padding rows: 0), instead of gathering pages per layer.
    block_tables: torch.Tensor | None = None
    seq_lens: torch.Tensor | None = None
    page_size: int = 0
    # CPU decode: the step's chunks, from which `_decode_tables` builds the gather tables.
    _decode_chunks: Sequence[SeqChunk] | None = field(default=None, repr=False)
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
            self._decode_tables()
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
            self._decode_tables()
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
        paged_decode: bool | None = None,
    ) -> AttentionMetadata:
        """`all_logits` asks for every token's logits (reference checks, prompt logprobs).
        `paged_decode`: a decode step's attention reads pages in place from block tables
        (default: on CUDA; the CPU runner asks for it when its native kernels are built)."""
        if not chunks:
            raise ValueError("a step needs at least one request")
        device = torch.device(device)
        if is_decode_step(chunks):
            if device.type == "cuda" if paged_decode is None else paged_decode:
                rows = len(chunks)
                packed = torch.from_numpy(pack_decode_step(chunks, page_size, rows)).to(device)
                scalars, table = packed[: 4 * rows].view(4, rows), packed[4 * rows :]
                return cls.for_paged_decode(scalars, table.view(rows, -1), page_size)
            return cls._build_decode(chunks, page_size, device)
        return cls._build_prefill(chunks, page_size, device, all_logits)

    @classmethod
    def for_paged_decode(
        cls, scalars: torch.Tensor, table: torch.Tensor, page_size: int
    ) -> AttentionMetadata:
        """Decode metadata read in place from pages (CUDA, or the CPU's native kernels), over
        tensors laid out as `pack_decode_step` writes them:
        `scalars` [4, B] (token ids, positions, slots, lengths) and the page table [B, >= pages].
        """
        rows = scalars.shape[1]
        return cls(
            positions=scalars[1],
            slot_mapping=scalars[2],
            is_decode=True,
            query_lens=[1] * rows,
            prefix_lens=[],
            prefix_slots=[],
            decode_slots=None,
            decode_mask=None,
            logits_indices=torch.arange(rows, device=scalars.device),
            block_tables=table,
            seq_lens=scalars[3],
            page_size=page_size,
        )

    @classmethod
    def _build_decode(
        cls, chunks: Sequence[SeqChunk], page_size: int, device: torch.device
    ) -> AttentionMetadata:
        """One new token per request. Slots come from Python ints: at decode sizes per-request
        tensor ops would cost more than the model. The padded page table, slots and mask for
        gathering pages are built on first use (`decode_gather_index`, `decode_bias`)."""
        starts = [c.start for c in chunks]
        slots = [
            c.pages[s // page_size] * page_size + s % page_size
            for c, s in zip(chunks, starts, strict=True)
        ]
        both = torch.tensor([starts, slots], dtype=torch.int64).to(device)
        batch = len(chunks)
        return cls(
            positions=both[0],
            slot_mapping=both[1],
            is_decode=True,
            query_lens=[1] * batch,
            prefix_lens=starts,
            prefix_slots=[],
            decode_slots=None,
            decode_mask=None,
            # Every row wants logits: the model skips the row gather when R == T.
            logits_indices=torch.arange(batch, device=device),
            page_size=page_size,
            _decode_chunks=chunks,
        )

    def _decode_tables(self) -> None:
        """Fills `decode_slots` [B, span] and `decode_mask` [B, 1, 1, span] of a CPU decode
        step from its chunks' page lists (one page table tensor, no per-request tensors)."""
        if self.decode_slots is not None or self._decode_chunks is None:
            return
        chunks, page_size = self._decode_chunks, self.page_size
        device = self.positions.device
        span = max(self.prefix_lens) + 1
        num_pages = -(-span // page_size)
        rows = []
        for c in chunks:
            pages = list(c.pages[:num_pages])
            rows.append(pages + [0] * (num_pages - len(pages)))
        table = torch.tensor(rows, dtype=torch.int64)
        positions = torch.tensor(self.prefix_lens, dtype=torch.int64)
        offsets = torch.arange(page_size)
        decode_slots = (table[:, :, None] * page_size + offsets).view(len(chunks), -1)[:, :span]
        decode_mask = (torch.arange(span)[None, :] <= positions[:, None])[:, None, None, :]
        self.decode_slots = decode_slots.to(device)
        self.decode_mask = decode_mask.to(device)

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
            wanted = []
            for e, c in zip(ends, chunks, strict=True):
                if c.all_logits:
                    wanted.extend(range(e - c.num_new, e))
                elif c.wants_logits:
                    wanted.append(e - 1)
            logits_indices = torch.tensor(wanted, dtype=torch.int64)
        cu_seqlens = torch.tensor([0, *accumulate(query_lens)])
        parts = [positions, slot_mapping, logits_indices, cu_seqlens]
        for i, c in enumerate(chunks):
            if c.start > 0:
                span = torch.arange(c.start + c.num_new)
                parts.append(table[i, span // page_size] * page_size + span % page_size)
        # One host-to-device copy for the whole step, split into views on the device.
        uploaded = torch.cat(parts).to(device).split([int(p.shape[0]) for p in parts])
        positions, slot_mapping, logits_indices, cu_seqlens, *prefixes = uploaded
        prefix_slots = [None if c.start == 0 else prefixes.pop(0) for c in chunks]
        fresh = len(chunks) > 1 and device.type == "cuda" and not any(prefix_lens)
        return cls(
            positions=positions,
            slot_mapping=slot_mapping,
            is_decode=False,
            query_lens=query_lens,
            prefix_lens=prefix_lens,
            prefix_slots=prefix_slots,
            decode_slots=None,
            decode_mask=None,
            logits_indices=logits_indices,
            cu_seqlens=cu_seqlens.int(),
            varlen_max=max(query_lens) if fresh else None,
        )

    @classmethod
    def for_cuda_prefill(
        cls, packed: torch.Tensor, tokens: int, seqs: int, page_size: int
    ) -> AttentionMetadata:
        """Fresh-prompt prefill metadata over a device buffer laid out as `pack_prefill_step`
        writes it, for a captured step of `tokens` token rows and `seqs` requests."""
        _, positions, slots, rest = packed[: 3 * tokens + 2 * seqs + 1].split(
            [tokens, tokens, tokens, 2 * seqs + 1]
        )
        logits_indices, cu_seqlens = rest.split([seqs, seqs + 1])
        return cls(
            positions=positions,
            slot_mapping=slots,
            is_decode=False,
            query_lens=[],
            prefix_lens=[],
            prefix_slots=[],
            decode_slots=None,
            decode_mask=None,
            logits_indices=logits_indices,
            cu_seqlens=cu_seqlens,
            varlen_max=tokens,
            page_size=page_size,
        )


def is_decode_step(chunks: Sequence[SeqChunk]) -> bool:
    """One new token for every request, each continuing a context and wanting its logits (a
    1-token prompt chunk that wants none is prefill: the decode path returns every row)."""
    return all(c.num_new == 1 and c.start > 0 and c.wants_logits for c in chunks)


def pack_decode_step(
    chunks: Sequence[SeqChunk],
    page_size: int,
    rows: int,
    width: int | None = None,
    token_ids: np.ndarray | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """A decode step's metadata as one int32 array, the layout `for_paged_decode` reads:
    `[ids | positions | slots | lengths]` of `rows` entries each, then a `rows x width` page
    table (`width` at least the most pages a request holds; entries past a request's pages are
    left as they were, as are padding rows' pages: nothing reads them). Rows past the batch are
    padding: slot -1 (no KV write), length 0 (no attention). Written into `out` when given."""
    batch = len(chunks)
    counts = [c.start // page_size + 1 for c in chunks]
    width = width or max(counts)
    size = 4 * rows + rows * width
    buf = np.empty(size, np.int32) if out is None else out[:size]
    scalars = buf[: 4 * rows].reshape(4, rows)
    starts = [c.start for c in chunks]
    scalars[0, :batch] = 0 if token_ids is None else token_ids
    scalars[1, :batch] = starts
    scalars[2, :batch] = [
        c.pages[s // page_size] * page_size + s % page_size
        for c, s in zip(chunks, starts, strict=True)
    ]
    scalars[3, :batch] = [s + 1 for s in starts]
    if rows > batch:
        scalars[:, batch:] = 0
        scalars[2, batch:] = -1
    # One conversion of every page id (Python ints) and one masked store, not a loop of rows.
    pages = np.fromiter(
        chain.from_iterable(c.pages[:n] for c, n in zip(chunks, counts, strict=True)),
        np.int32,
        sum(counts),
    )
    table = buf[4 * rows :].reshape(rows, width)
    table[:batch][np.arange(width)[None, :] < np.array(counts)[:, None]] = pages
    return buf


def pack_prefill_step(
    chunks: Sequence[SeqChunk],
    page_size: int,
    tokens: int,
    seqs: int,
    token_ids: np.ndarray | None,
    out: np.ndarray,
) -> np.ndarray:
    """A fresh-prompt prefill step's metadata as one int32 array, the layout
    `for_cuda_prefill` reads: `[ids | positions | slots]` of `tokens` rows, the logit rows
    (`seqs`, padding pointing at row 0), then `seqs + 1` query offsets (padding requests are
    empty). Token rows past the step's are padding: slot -1 (no KV write), in no request."""
    lens = [c.num_new for c in chunks]
    n = sum(lens)
    buf = out[: 3 * tokens + 2 * seqs + 1]
    ids, positions, slots = buf[:tokens], buf[tokens : 2 * tokens], buf[2 * tokens : 3 * tokens]
    logits, cu = buf[3 * tokens : 3 * tokens + seqs], buf[3 * tokens + seqs :]
    ids[:n] = 0 if token_ids is None else token_ids
    ids[n:] = 0
    positions[:n] = np.concatenate([np.arange(k, dtype=np.int32) for k in lens])
    positions[n:] = 0
    pages = np.concatenate(
        [
            np.asarray(c.pages[: -(-k // page_size)], np.int32)
            for c, k in zip(chunks, lens, strict=True)
        ]
    )
    first_page = np.repeat(np.cumsum([0] + [-(-k // page_size) for k in lens[:-1]]), lens)
    slots[:n] = pages[first_page + positions[:n] // page_size] * page_size + (
        positions[:n] % page_size
    )
    slots[n:] = -1
    cu[0] = 0
    cu[1 : len(lens) + 1] = np.cumsum(lens)
    cu[len(lens) + 1 :] = n
    wanted = [
        end - 1 for end, c in zip(cu[1 : len(lens) + 1], chunks, strict=True) if c.wants_logits
    ]
    logits[: len(wanted)] = wanted
    logits[len(wanted) :] = 0
    return buf


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
    return attend(q, k, v, k_cache, v_cache, meta)


def attend(q, k, v, k_cache, v_cache, meta: AttentionMetadata) -> torch.Tensor:
    """Attention of a step whose K/V are already in the cache; returns [T, H, D]."""
    if meta.block_tables is not None:
        from engine import kernels  # Triton: CUDA only

        return kernels.paged_decode_attention(
            q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.page_size
        )
    if meta.is_decode:
        return _decode(q, k_cache, v_cache, meta)
    return _prefill(q, k, v, k_cache, v_cache, meta)


def _decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata):
    """CPU: one query row per request against its pages, gathered head-major in one op per
    K/V."""
    batch, dim = q.shape[0], q.shape[2]
    kv_heads = k_cache.shape[1]
    index = meta.decode_gather_index(kv_heads)
    span = index.shape[0] // (batch * kv_heads)
    # index_select on flat rows is several times faster than advanced indexing on CPU.
    keys = k_cache.view(-1, dim).index_select(0, index).view(batch * kv_heads, span, dim)
    values = v_cache.view(-1, dim).index_select(0, index).view(batch * kv_heads, span, dim)
    return _decode_cpu(q, keys, values, meta.decode_bias(kv_heads, torch.float32))


def _decode_cpu(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """Two batched matmuls, which beat SDPA for one query row on CPU: each KV head serves its
    group of query heads in a single [group, dim] x [dim, span] product, the mask and scale
    folded into the first (baddbmm)."""
    batch, heads, dim = q.shape
    rows = keys.shape[0]  # batch * kv_heads
    dtype = q.dtype
    if dtype != torch.float32:  # scores and softmax in float32, as the reference does
        q, keys, values = q.float(), keys.float(), values.float()
    grouped = q.reshape(rows, heads * batch // rows, dim)
    scores = torch.baddbmm(bias, grouped, keys.transpose(1, 2), alpha=dim**-0.5)
    out = torch.bmm(torch.softmax(scores, dim=-1), values)
    return out.view(batch, heads, dim).to(dtype)


def _prefill(q, k, v, k_cache, v_cache, meta: AttentionMetadata) -> torch.Tensor:
    """Per request: SDPA over the chunk's own K/V (causal), or over its gathered prefix and the
    chunk (causal, aligned to the last key) when the chunk continues a prompt. On CUDA several
    fresh prompts go to flash attention's variable-length kernel in one call instead."""
    if meta.varlen_max is not None and q.dtype != torch.float32:  # flash: half precision
        from torch.nn.attention.varlen import varlen_attn  # recent torch (2.11 has it)

        cu, longest = meta.cu_seqlens, meta.varlen_max
        return varlen_attn(q, k, v, cu, cu, longest, longest, window_size=(-1, 0))
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
            mask = causal_lower_right(n, prefix + n)
            oi = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, enable_gqa=True)
        outs.append(oi.squeeze(0).transpose(0, 1))
        offset += n
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
