"""The building blocks of a Llama/Qwen2 decoder layer, named after what they are.

On CUDA the element-wise steps (residual add + norm, rotary + KV write, SwiGLU's activation)
run as one Triton kernel each (engine/kernels.py); on the CPU in float32 as native kernels
(engine/cpu_kernels.py), else as the torch ops below; a CPU decode step that reads pages in
place runs through engine/cpu_decode.py instead (the same kernels, no module calls). Layers pass
the residual stream beside their output, so its add fuses into the next norm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine import cpu_kernels
from engine.attention import AttentionMetadata, attend, paged_attention
from engine.config import ModelConfig
from engine.linear import Linear
from engine.rotary import RotaryEmbedding


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual); without a residual, (norm(x), x)."""
        if x.is_cuda:
            from engine import kernels  # Triton: CUDA only

            return kernels.rms_norm(x, self.weight, self.eps, residual)
        if cpu_kernels.usable(x):
            return cpu_kernels.rms_norm(x, self.weight, self.eps, residual)
        if residual is not None:
            x = x + residual
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps), x
        # Half precision: normalise in float32 as the reference implementations do.
        normed = F.rms_norm(x.float(), self.weight.shape, None, self.eps)
        return self.weight * normed.to(x.dtype), x


class SelfAttention(nn.Module):
    """Grouped-query attention with fused q/k/v projection (bias for Qwen2) and paged KV."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size, self.kv_size = config.q_size, config.kv_size
        self.qkv_proj = Linear(
            config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias
        )
        self.o_proj = Linear(self.q_size, config.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        tokens = x.shape[0]
        qkv = self.qkv_proj(x)
        if qkv.is_cuda:
            from engine import kernels  # Triton: CUDA only

            kernels.rotary_store(
                qkv, cos, sin, kv[0], kv[1], meta.slot_mapping, self.num_heads, self.num_kv_heads
            )
            q, k, v = qkv.view(tokens, -1, self.head_dim).split(
                [self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=1
            )
            out = attend(q, k, v, kv[0], kv[1], meta)
            return self.o_proj(out.reshape(tokens, self.q_size))
        qk, v = qkv.split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        # q and k heads sit side by side in the fused projection: rotate them in one go.
        qk = RotaryEmbedding.apply(
            qk.view(tokens, self.num_heads + self.num_kv_heads, self.head_dim), cos, sin
        )
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        v = v.view(tokens, self.num_kv_heads, self.head_dim)
        out = paged_attention(q, k, v, kv[0], kv[1], meta)
        return self.o_proj(out.reshape(tokens, self.q_size))


class SwiGLU(nn.Module):
    """The gated MLP: down(silu(gate(x)) * up(x)), gate and up fused into one matmul."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if gate_up.is_cuda:
            from engine import kernels  # Triton: CUDA only

            return self.down_proj(kernels.silu_mul(gate_up))
        if cpu_kernels.usable(gate_up):
            return self.down_proj(cpu_kernels.silu_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = SelfAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config)

    def forward(
        self, h, residual, cos, sin, kv, meta: AttentionMetadata
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The hidden state is `h + residual` (`residual` None: `h`); returns the same pair."""
        x, residual = self.input_layernorm(h, residual)
        h = self.self_attn(x, cos, sin, kv, meta)
        x, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(x), residual
