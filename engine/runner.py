"""Runs one stage's forward over its paged KV cache: the piece a PP stage actor and the
whole-model engine share. On CUDA, decode steps and short fresh-prompt prefill steps replay
CUDA graphs (engine/cuda_graphs.py); on the CPU, float32 decode steps read pages in place with
the native kernels (engine/cpu_kernels.py)."""

from __future__ import annotations

import gc
from collections.abc import Sequence

import torch

from engine import cpu_kernels
from engine.attention import AttentionMetadata, SeqChunk, is_decode_step
from engine.kv_cache import KVCacheSpec, PagedKVCache
from engine.model import DecoderStage


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # bf16 matmuls are the fast path on GPUs; on CPUs float32 is both faster and exact.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
            dtype
        ]
    except KeyError:
        raise ValueError(
            f"unsupported dtype {dtype!r} (auto, float32, bfloat16, float16)"
        ) from None


def page_bytes(spec: KVCacheSpec, num_layers: int) -> int:
    """Bytes one page costs across K and V of `num_layers` layers."""
    elem = torch.empty((), dtype=spec.dtype).element_size()
    return 2 * spec.page_size * spec.num_kv_heads * spec.head_dim * elem * num_layers


def freeze_loaded_objects() -> None:
    """Move what a serving process has loaded (modules, parameters, tokenizer), which lives as
    long as the process, out of the garbage collector's sight, so the collections that each
    step's objects trigger stop rescanning it (~7% of a CPU decode step's samples); vLLM does the
    same after loading. Once per process, when loading is done: it collects first."""
    gc.collect()
    gc.freeze()


class StageRunner:
    def __init__(
        self,
        stage: DecoderStage,
        kv_cache: PagedKVCache,
        max_decode_batch: int = 128,
        cuda_graphs: bool = True,
    ) -> None:
        """`max_decode_batch`: the largest decode batch replayed from a CUDA graph (larger ones
        run eagerly); `cuda_graphs=False` runs every CUDA step eagerly."""
        if kv_cache.num_layers != len(stage.layers):
            raise ValueError(
                f"KV cache holds {kv_cache.num_layers} layers, the stage {len(stage.layers)}"
            )
        self.stage = stage
        self.kv_cache = kv_cache
        self.device = next(stage.parameters()).device
        self.cuda_graphs = None
        # Decode reads pages in place on CUDA, and on the CPU when the native kernels take the
        # cache's dtype; otherwise each layer gathers the batch's pages with torch ops.
        self.paged_decode = self.device.type == "cuda" or cpu_kernels.usable(kv_cache.layers[0])
        if self.device.type == "cuda":
            from engine.cuda_graphs import CudaGraphRunner

            self.cuda_graphs = CudaGraphRunner(stage, kv_cache, max_decode_batch, cuda_graphs)

    @property
    def page_size(self) -> int:
        return self.kv_cache.spec.page_size

    def forward(
        self, chunks: Sequence[SeqChunk], inputs: torch.Tensor, all_logits: bool = False
    ) -> torch.Tensor:
        """Token ids [T] (first stage) or hidden states [T, H] in; hidden states or logits out.

        On CUDA the result of a step replayed from a graph is a view of the graphs' output
        buffer, valid until the next step: consume it (sample, copy) first."""
        if self.cuda_graphs is not None:
            if is_decode_step(chunks):
                return self.cuda_graphs.decode(chunks, inputs)
            if not all_logits and (out := self.cuda_graphs.prefill(chunks, inputs)) is not None:
                return out
        meta = AttentionMetadata.build(
            chunks, self.page_size, self.device, all_logits, paged_decode=self.paged_decode
        )
        if inputs.shape[0] != meta.num_tokens:
            raise ValueError(f"{inputs.shape[0]} input rows for a step of {meta.num_tokens} tokens")
        return self.stage(inputs.to(self.device, non_blocking=True), meta, self.kv_cache)
