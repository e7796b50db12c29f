"""A float32 CPU decode step through a stage's layers as one plain loop.

Why: at decode batch sizes a layer's arithmetic is well under a millisecond on a few cores, and
the generic forward's Python around it (nine module calls a layer, device and dtype checks,
attribute lookups through `nn.Module`) cost about 0.3 ms of a batch-32 step of the generated
model, ~9% (tests/engine/test_native_decode.py checks the result, benchmarks/engine_bench.py
the speed). This runs the same native kernels (engine/cpu_kernels.py) and packed linears as the
layers' CPU branches, from per-layer tuples gathered once. The modules stay the one definition
of the model: prefill, CUDA and the torch-ops fallback run through them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from engine import cpu_kernels
from engine.attention import AttentionMetadata
from engine.kv_cache import PagedKVCache
from engine.layers import DecoderLayer


class _Layer(NamedTuple):
    input_norm: torch.Tensor
    input_eps: float
    qkv: nn.Module
    o: nn.Module
    post_norm: torch.Tensor
    post_eps: float
    gate_up: nn.Module
    down: nn.Module
    heads: int

    @classmethod
    def of(cls, layer: DecoderLayer) -> _Layer:
        attn, mlp = layer.self_attn, layer.mlp
        return cls(
            layer.input_layernorm.weight,
            layer.input_layernorm.eps,
            attn.qkv_proj,
            attn.o_proj,
            layer.post_attention_layernorm.weight,
            layer.post_attention_layernorm.eps,
            mlp.gate_up_proj,
            mlp.down_proj,
            attn.num_heads,
        )


class CpuDecodeLayers:
    """Runs a decode step (metadata from `AttentionMetadata.for_paged_decode`) through
    `layers` on the CPU in float32, reading the KV pages in place.

    Holds the layers' own parameter and module objects, so weights loaded or packed again in
    place are seen; a stage moved to another device or dtype must build a new one."""

    def __init__(self, layers: nn.ModuleList) -> None:
        self._layers = [_Layer.of(layer) for layer in layers]

    def __call__(
        self,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        meta: AttentionMetadata,
        kv_cache: PagedKVCache,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states `[B, hidden]` in; `(h, residual)` out, as the layer loop returns."""
        rows = h.shape[0]
        residual = None
        positions, tables, page_size = meta.positions, meta.block_tables, meta.page_size
        for i, layer in enumerate(self._layers):
            x, residual = cpu_kernels.rms_norm(h, layer.input_norm, layer.input_eps, residual)
            qkv = layer.qkv.forward(x)
            out = cpu_kernels.decode_attention(
                qkv, cos, sin, *kv_cache.flat_kv(i), positions, tables, page_size, layer.heads
            )
            h = layer.o.forward(out.view(rows, -1))
            x, residual = cpu_kernels.rms_norm(h, layer.post_norm, layer.post_eps, residual)
            h = layer.down.forward(cpu_kernels.silu_mul(layer.gate_up.forward(x)))
        assert residual is not None  # a stage has at least one layer
        return h, residual
