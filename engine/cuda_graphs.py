"""Steps on CUDA replayed from CUDA graphs: decode steps, and prefill steps of short fresh prompts.

A step of a 28-layer model is a few hundred small kernels; launched one by one from Python they
take several times longer than the GPU needs to run them (a 512-token prefill of a 1.5B model
as much as a 8k-token one). So the forward is captured once per shape, on first use, and a step
is one graph launch. A shape is a bucket of sizes; rows beyond the step's are padding the
kernels skip (slot -1: no KV write; length 0 or no request: no attention), so a graph of 16
rows serves a batch of 9. The graph reads its metadata straight from a device buffer at fixed
offsets; each step the host packs token ids, positions, KV slots, lengths and page table (or
query offsets) into the pinned twin of that buffer and uploads it in one copy. Nothing in a step
waits for the GPU. Every graph writes its result into one shared output buffer, so graph memory
does not grow with the number of shapes.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Callable, Sequence

import torch

from engine.attention import AttentionMetadata, SeqChunk, pack_decode_step, pack_prefill_step
from engine.kv_cache import PagedKVCache
from engine.model import DecoderStage

PREFILL_TOKENS = [128, 256, 512, 1024, 2048]  # longer steps are GPU-bound: run eagerly
PREFILL_SEQS = [1, 2, 4, 8, 16, 32, 64]


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then steps of 8 to 64 and of 16 beyond: padding wastes at most ~1/4."""
    sizes = [1, 2, 4, 8, *range(16, 65, 8), *range(80, max_batch + 16, 16)]
    return sorted({min(s, max_batch) for s in sizes})


def _bucket(buckets: list[int], n: int) -> int:
    return buckets[bisect.bisect_left(buckets, n)]


class CudaGraphRunner:
    """Runs a stage's decode steps, and its prefill steps of fresh prompts up to 2048 tokens (in
    half precision: the variable-length flash kernel), from CUDA graphs. Other steps (larger
    batches than `max_batch`, chunks continuing a prompt, float32) return None from `prefill`
    and run eagerly with the same kernels; `use_graphs=False` runs every step eagerly."""

    def __init__(
        self, stage: DecoderStage, kv_cache: PagedKVCache, max_batch: int, use_graphs: bool
    ) -> None:
        self.stage = stage
        self.kv_cache = kv_cache
        self.device = next(stage.parameters()).device
        self.dtype = next(stage.parameters()).dtype
        self.page_size = kv_cache.spec.page_size
        self.use_graphs = use_graphs
        self.buckets = batch_buckets(max_batch)
        self.max_batch = self.buckets[-1]
        config = stage.config
        # A request never holds more pages than the cache has, nor than the context allows.
        self.max_pages = min(
            kv_cache.spec.num_pages, -(-config.max_position_embeddings // self.page_size)
        )
        tokens, seqs = PREFILL_TOKENS[-1], PREFILL_SEQS[-1]
        size = max(4 * self.max_batch + self.max_batch * self.max_pages, 3 * tokens + 2 * seqs + 1)
        self._host = torch.empty(size, dtype=torch.int32, pin_memory=True)
        self._device = torch.zeros(size, dtype=torch.int32, device=self.device)
        self._uploaded = torch.cuda.Event()
        self._uploaded.record()
        rows = max(self.max_batch, tokens)
        if not stage.is_first:
            self._hidden = torch.zeros(
                (rows, config.hidden_size), dtype=self.dtype, device=self.device
            )
        out_shape = (max(self.max_batch, seqs), config.vocab_size)
        if not stage.is_last:
            out_shape = (rows, config.hidden_size)
        self._out = torch.empty(
            out_shape, dtype=torch.float32 if stage.is_last else self.dtype, device=self.device
        )
        self._graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self._pool = None

    def decode(self, chunks: Sequence[SeqChunk], inputs: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] (last stage) or hidden states [B, H]. From a graph the result is a view
        of the shared output buffer: valid until the next step."""
        batch = len(chunks)
        ids = inputs.numpy() if self.stage.is_first and not inputs.is_cuda else None
        if not self.use_graphs or batch > self.max_batch:
            packed = torch.from_numpy(pack_decode_step(chunks, self.page_size, batch, None, ids))
            uploaded = packed.to(self.device, non_blocking=True)
            meta = AttentionMetadata.for_paged_decode(
                uploaded[: 4 * batch].view(4, batch),
                uploaded[4 * batch :].view(batch, -1),
                self.page_size,
            )
            first = uploaded[:batch] if ids is not None else inputs.to(self.device)
            return self.stage(first, meta, self.kv_cache)
        rows = _bucket(self.buckets, batch)
        pages = max(c.start for c in chunks) // self.page_size + 1
        width = min(self.max_pages, max(16, 1 << (pages - 1).bit_length()))
        graph = self._graph(("decode", rows, width), rows, self._decode_meta)
        self._uploaded.synchronize()  # the last upload has left the pinned buffer
        packed = pack_decode_step(chunks, self.page_size, rows, width, ids, self._host.numpy())
        self._replay(graph, packed.shape[0], inputs, batch, ids is None)
        return self._out[:batch]

    def prefill(self, chunks: Sequence[SeqChunk], inputs: torch.Tensor) -> torch.Tensor | None:
        """A step of fresh prompts (every chunk from position 0) from a graph, or None when the
        step does not fit one. Returns the logits of the chunks that want them (last stage) or
        the hidden states of every token, as a view of the shared output buffer."""
        n = int(inputs.shape[0])
        if (
            not self.use_graphs
            or self.dtype == torch.float32
            or n > PREFILL_TOKENS[-1]
            or len(chunks) > PREFILL_SEQS[-1]
            or any(c.start for c in chunks)
        ):
            return None
        tokens, seqs = _bucket(PREFILL_TOKENS, n), _bucket(PREFILL_SEQS, len(chunks))
        graph = self._graph(("prefill", tokens, seqs), tokens, self._prefill_meta(seqs))
        ids = inputs.numpy() if self.stage.is_first and not inputs.is_cuda else None
        self._uploaded.synchronize()
        packed = pack_prefill_step(chunks, self.page_size, tokens, seqs, ids, self._host.numpy())
        self._replay(graph, packed.shape[0], inputs, n, ids is None)
        if not self.stage.is_last:
            return self._out[:n]
        return self._out[: sum(c.wants_logits for c in chunks)]

    def _replay(
        self, graph: torch.cuda.CUDAGraph, size: int, inputs: torch.Tensor, n: int, on_gpu: bool
    ) -> None:
        self._device[:size].copy_(self._host[:size], non_blocking=True)
        self._uploaded.record()
        if not self.stage.is_first:
            self._hidden[:n].copy_(inputs, non_blocking=True)
        elif on_gpu:
            self._device[:n].copy_(inputs)  # token ids already on the GPU lead both layouts
        graph.replay()

    def _decode_meta(self, rows: int, width: int) -> AttentionMetadata:
        scalars = self._device[: 4 * rows].view(4, rows)
        table = self._device[4 * rows : 4 * rows + rows * width].view(rows, width)
        return AttentionMetadata.for_paged_decode(scalars, table, self.page_size)

    def _prefill_meta(self, seqs: int) -> Callable[[int, int], AttentionMetadata]:
        def make(tokens: int, _: int) -> AttentionMetadata:
            meta = AttentionMetadata.for_cuda_prefill(self._device, tokens, seqs, self.page_size)
            if seqs > 1:
                return meta
            # One prompt: SDPA's causal kernel over the whole bucket instead of the varlen flash
            # call. The prompt's rows come first and attend only to earlier rows, so the padding
            # after them changes nothing they compute; on an H100 SDPA runs cuDNN's sm90 flash
            # kernel, 11 us per layer for 512 tokens against 36 us for varlen's (1x512 prefill
            # of the 1.5B shape: 4.45 -> 3.7 ms, see benchmarks/gpu/NOTES_engine.md).
            return dataclasses.replace(
                meta, varlen_max=None, query_lens=[tokens], prefix_lens=[0], prefix_slots=[None]
            )

        return make

    def _graph(
        self, key: tuple, rows: int, make_meta: Callable[[int, int], AttentionMetadata]
    ) -> torch.cuda.CUDAGraph:
        graph = self._graphs.get(key)
        if graph is not None:
            return graph
        # Capture over padding only (token ids 0, slots -1, lengths and query offsets 0): the
        # warm-up run that compiles the kernels, and the capture, leave the KV cache untouched.
        # Both layouts put the token ids first and the slots at rows [2 * rows, 3 * rows).
        self._device.zero_()
        self._device[2 * rows : 3 * rows].fill_(-1)
        meta = make_meta(rows, key[-1])
        inputs = self._device[:rows] if self.stage.is_first else self._hidden[:rows]
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self.stage(inputs, meta, self.kv_cache)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA calls the transport makes on its own threads meanwhile (KV copies)
        # must neither break the capture nor be refused by it.
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            out = self.stage(inputs, meta, self.kv_cache)
            self._out[: out.shape[0]].copy_(out)
        self._pool = graph.pool()
        self._graphs[key] = graph
        return graph
