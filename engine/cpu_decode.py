"""A CPU decode step through a stage's layers as one plain loop, float32 or bfloat16 models.

Why: at decode batch sizes a layer's arithmetic is well under a millisecond on a few cores, and
the generic forward's Python around it (nine module calls a layer, device and dtype checks,
attribute lookups through `nn.Module`) cost ~5% of a batch-32 forward of the generated model,
measured paired in one process (tests/engine/test_native_decode.py checks the result,
benchmarks/engine_bench.py the speed). This runs the layers' native kernels
(engine/cpu_kernels.py), and their linears on the weights packed in panels for decode
(engine/linear.py) where they have them, from per-layer tuples gathered once. The modules stay
the one definition of the model: prefill, CUDA and the torch-ops fallback run through them.

A bf16 model's step reads bf16 weights and KV pages but carries its activations (hidden state,
residual, q/k/v, MLP) in float32 from kernel to kernel: they are a few KiB against the MiBs of
weights a step reads, so float32 costs nothing in bytes, saves a narrowing and a widening per op,
and is at least as accurate as rounding each to bf16 as the modules' ops (prefill) do.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from engine import cpu_kernels
from engine.attention import AttentionMetadata
from engine.kv_cache import PagedKVCache
from engine.layers import DecoderLayer
from engine.linear import Linear

Matmul = Callable[[torch.Tensor], torch.Tensor]


def float32_matmul(linear: Linear) -> Matmul:
    """The linear's decode matmul, float32 in and out: on its panels when packed (read at each
    call, so a new pack is seen), else its decode forward (oneDNN) in its own dtype. Also the
    CPU LM head's, in prefill too: float32 logits of a bf16 model."""

    def matmul(x: torch.Tensor) -> torch.Tensor:
        panels = linear.panels
        if panels is None:
            return linear.decode_forward(x.to(linear.weight.dtype)).float()
        return cpu_kernels.panel_linear(x.float(), panels, linear.out_features, linear.bias)

    return matmul


class _Layer(NamedTuple):
    input_norm: torch.Tensor
    input_eps: float
    qkv: Matmul
    o: Matmul
    post_norm: torch.Tensor
    post_eps: float
    gate_up: Matmul
    down: Matmul
    heads: int

    @classmethod
    def of(cls, layer: DecoderLayer) -> _Layer:
        attn, mlp = layer.self_attn, layer.mlp
        return cls(
            layer.input_layernorm.weight,
            layer.input_layernorm.eps,
            float32_matmul(attn.qkv_proj),
            float32_matmul(attn.o_proj),
            layer.post_attention_layernorm.weight,
            layer.post_attention_layernorm.eps,
            float32_matmul(mlp.gate_up_proj),
            float32_matmul(mlp.down_proj),
            attn.num_heads,
        )


class CpuDecodeLayers:
    """Runs a decode step (metadata from `AttentionMetadata.for_paged_decode`) through
    `layers` on the CPU, float32 inside, reading the KV pages (float32 or bf16) in place.

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
        """Hidden states `[B, hidden]` in (the model's dtype); float32 `(h, residual)` out, as
        the layer loop returns. cos and sin: float32 rotary tables."""
        rows = h.shape[0]
        h = h.float()
        residual = None
        positions, tables, page_size = meta.positions, meta.block_tables, meta.page_size
        for i, layer in enumerate(self._layers):
            x, residual = cpu_kernels.rms_norm(h, layer.input_norm, layer.input_eps, residual)
            qkv = layer.qkv(x)
            out = cpu_kernels.decode_attention(
                qkv, cos, sin, *kv_cache.flat_kv(i), positions, tables, page_size, layer.heads
            )
            h = layer.o(out.view(rows, -1))
            x, residual = cpu_kernels.rms_norm(h, layer.post_norm, layer.post_eps, residual)
            h = layer.down(cpu_kernels.silu_mul(layer.gate_up(x)))
        assert residual is not None  # a stage has at least one layer
        return h, residual
