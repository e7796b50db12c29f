"""Rotary position embeddings with the scaling variants Llama and Qwen2 configs use.

The inverse frequencies are computed once per model; cos/sin are computed per forward from the
batch's absolute positions, so paged and chunked batches need no precomputed tables.
"""

from __future__ import annotations

import math

import torch

from engine import cpu_kernels
from engine.config import RopeConfig


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def inverse_frequencies(
    rope: RopeConfig, head_dim: int, max_positions: int
) -> tuple[torch.Tensor, float]:
    """Return (inv_freq [head_dim/2], attention scaling applied to cos and sin)."""
    dim = head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    inv_freq = 1.0 / (rope.theta**exponents)
    original = rope.original_max_position_embeddings or max_positions
    match rope.rope_type:
        case "default":
            return inv_freq, 1.0
        case "linear":
            return inv_freq / rope.factor, 1.0
        case "dynamic":
            # NTK-aware scaling; identical to default up to the trained context. We scale the base
            # for the configured context at load time instead of per batch length, which keeps
            # positions of one request consistent across chunks and decode steps.
            if max_positions <= original:
                return inv_freq, 1.0
            seq_len = max_positions
            base = rope.theta * ((rope.factor * seq_len / original) - (rope.factor - 1)) ** (
                dim / (dim - 2)
            )
            return 1.0 / (base**exponents), 1.0
        case "llama3":
            low_wavelen = original / rope.low_freq_factor
            high_wavelen = original / rope.high_freq_factor
            wavelen = 2 * math.pi / inv_freq
            scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
            smooth = (original / wavelen - rope.low_freq_factor) / (
                rope.high_freq_factor - rope.low_freq_factor
            )
            smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
            medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
            return torch.where(medium, smoothed, scaled), 1.0
        case "yarn":
            return _yarn(rope, dim, original)
    raise AssertionError(f"unhandled rope type {rope.rope_type}")  # config validated it


def _yarn(rope: RopeConfig, dim: int, original: int) -> tuple[torch.Tensor, float]:
    factor = rope.factor
    if rope.attention_factor is not None:
        attention = rope.attention_factor
    elif rope.mscale and rope.mscale_all_dim:
        attention = _yarn_mscale(factor, rope.mscale) / _yarn_mscale(factor, rope.mscale_all_dim)
    else:
        attention = _yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = rope.theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    extrapolation_weight = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight
    return inv_freq, attention


class RotaryEmbedding(torch.nn.Module):
    """Applies rotary embeddings (the non-interleaved "rotate half" layout of HF checkpoints)."""

    def __init__(self, rope: RopeConfig, head_dim: int, max_positions: int) -> None:
        super().__init__()
        inv_freq, scaling = inverse_frequencies(rope, head_dim, max_positions)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.scaling = scaling

    def cos_sin(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin of shape [tokens, 1, head_dim] for broadcasting over heads.

        The sin's first half is negated, so `apply` rotates with one `roll` instead of slicing,
        negating and concatenating the halves of every q and k head (same values, fewer ops).
        On the CPU in float32 one native call makes both (engine/cpu_kernels.py).
        """
        if dtype == torch.float32 and cpu_kernels.usable(self.inv_freq):
            positions = positions.contiguous()
            if positions.dtype in (torch.int32, torch.int64):
                return cpu_kernels.rotary_cos_sin(positions, self.inv_freq, self.scaling)
        freqs = positions.float()[:, None] * self.inv_freq.float()[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.scaling).to(dtype)
        sin = (emb.sin() * self.scaling).to(dtype)
        sin[:, : sin.shape[-1] // 2].neg_()
        return cos[:, None, :], sin[:, None, :]

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate-half: `x * cos + cat(-x2, x1) * sin`, written with the signed sin of `cos_sin`."""
        return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin
