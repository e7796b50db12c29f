"""CPU decode over a dense mirror of the running batch's KV, so no layer gathers pages per step.

On the CPU a decode step used to gather every request's K and V pages into one contiguous
tensor per layer, for the attention matmuls: the gather cost as much as the attention itself.
The mirror keeps that gathered tensor between steps instead, head-major `[B, Hkv, capacity, D]`
per layer, and each step appends the new token's K/V to it (as well as to the pages). It is
rebuilt, with one gather per layer, whenever the batch is not the previous step's batch one
token further on: a request joined, left or was preempted, or a prefill step ran. The paged
cache stays the source of truth (the transport reads and writes it); the mirror only ever
holds copies of what the pages hold.

Rows are told apart by their page list object (`SeqChunk.pages` is the request's live
`PageTable.pages`): a new request, or one recomputed after preemption, has a new list.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.attention import AttentionMetadata, SeqChunk

GROWTH = 16  # tokens of room added at a time


class DecodeKVMirror:
    """The mirror of one stage's layers; `max_bytes` bounds it (past that, layers gather)."""

    def __init__(self, num_layers: int, max_bytes: int = 1 << 30) -> None:
        self.num_layers = num_layers
        self.max_bytes = max_bytes
        self._rows: list[tuple[object, int]] = []  # (page list, position) of the last step
        self._layers: dict[int, tuple[torch.Tensor, torch.Tensor, bool]] = {}
        self._capacity = 0
        self._append_index: torch.Tensor | None = None

    def invalidate(self) -> None:
        """A step other than decode ran: rebuild before the next decode step."""
        self._rows = []

    def begin(self, chunks: Sequence[SeqChunk], meta: AttentionMetadata) -> None:
        """Prepares a decode step; sets `meta.mirror` when the step attends through it."""
        span = max(c.start for c in chunks) + 1
        continues = len(chunks) == len(self._rows) and all(
            c.pages is pages and c.start == position + 1
            for c, (pages, position) in zip(chunks, self._rows, strict=True)
        )
        self._rows = [(c.pages, c.start) for c in chunks]
        if not continues or span > self._capacity:
            # Attention runs over the whole capacity (contiguous: strided batches are several
            # times slower in bmm), so it grows in small steps; each growth is one gather.
            self._capacity = -(-span // GROWTH) * GROWTH
            self._layers = {key: (k, v, False) for key, (k, v, _) in self._layers.items()}
        self._span = span
        self._positions = meta.positions  # CPU: every chunk's start, as a tensor
        self._append_index = None
        self._bias: dict[int, torch.Tensor] = {}
        meta.mirror = self

    def keys_values(
        self,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """This layer's K and V of the batch as `[B * Hkv, capacity, D]`, the step's token
        appended; None when the mirror would exceed its memory budget (gather instead)."""
        batch, kv_heads, dim = k.shape
        shape = (batch, kv_heads, self._capacity, dim)
        key = k_cache.data_ptr()
        entry = self._layers.get(key)
        if entry is None or not entry[2] or entry[0].shape != shape:
            nbytes = 2 * batch * kv_heads * self._capacity * dim * k.element_size()
            if nbytes * self.num_layers > self.max_bytes:
                return None
            keys, values = self._rebuild(k_cache, v_cache, shape, meta)
            self._layers[key] = (keys, values, True)
        else:
            keys, values = entry[0], entry[1]
            index = self._index(batch, kv_heads)
            keys.view(-1, dim).index_copy_(0, index, k.reshape(-1, dim))
            values.view(-1, dim).index_copy_(0, index, v.reshape(-1, dim))
        rows = batch * kv_heads
        return keys.view(rows, self._capacity, dim), values.view(rows, self._capacity, dim)

    def bias(self, kv_heads: int) -> torch.Tensor:
        """Additive mask (0 or -inf) `[B * Hkv, 1, capacity]`: each request sees its tokens."""
        bias = self._bias.get(kv_heads)
        if bias is None:
            seen = torch.arange(self._capacity)[None, :] <= self._positions[:, None]
            bias = torch.where(seen, 0.0, float("-inf"))
            bias = bias[:, None, :].expand(-1, kv_heads, -1).reshape(-1, 1, self._capacity)
            self._bias[kv_heads] = bias
        return bias

    def _rebuild(self, k_cache, v_cache, shape, meta) -> tuple[torch.Tensor, torch.Tensor]:
        """One gather of every request's pages (the step's token already written to them)."""
        batch, kv_heads, _, dim = shape
        index = meta.decode_gather_index(kv_heads)
        span = self._span
        # Zeros past each request's length: masked out, but must not be NaN (0 * NaN).
        keys = torch.zeros(shape, dtype=k_cache.dtype)
        values = torch.zeros(shape, dtype=v_cache.dtype)
        keys[:, :, :span] = (
            k_cache.view(-1, dim).index_select(0, index).view(batch, kv_heads, span, dim)
        )
        values[:, :, :span] = (
            v_cache.view(-1, dim).index_select(0, index).view(batch, kv_heads, span, dim)
        )
        return keys, values

    def _index(self, batch: int, kv_heads: int) -> torch.Tensor:
        """Rows of a layer's `[B * Hkv * capacity, D]` view where the step's tokens go."""
        if self._append_index is None:
            rows = torch.arange(batch * kv_heads).view(batch, kv_heads)
            self._append_index = (rows * self._capacity + self._positions[:, None]).view(-1)
        return self._append_index
