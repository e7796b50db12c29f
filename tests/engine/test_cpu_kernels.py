"""The native CPU kernels equal the torch ops they replace, and they are really in use here.

A machine without a C compiler runs the engine on torch ops; this suite must not quietly pass
that way, so the first test fails loudly when the kernels cannot be built.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from engine import cpu_kernels
from engine.attention import AttentionMetadata, SeqChunk
from engine.config import RopeConfig
from engine.rotary import RotaryEmbedding


def test_kernels_build_and_load():
    cpu_kernels.require()
    assert cpu_kernels.usable(torch.zeros(1))
    assert cpu_kernels.usable(torch.zeros(1, dtype=torch.bfloat16))
    assert not cpu_kernels.usable(torch.zeros(1, dtype=torch.float16))


@pytest.mark.parametrize("rows,n", [(1, 64), (32, 256), (700, 576)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_equals_torch(rows, n, with_residual):
    gen = torch.Generator().manual_seed(rows + n)
    x = torch.randn(rows, n, generator=gen) * 3
    residual = torch.randn(rows, n, generator=gen) if with_residual else None
    weight = torch.randn(n, generator=gen)
    out, total = cpu_kernels.rms_norm(x, weight, 1e-6, residual)
    expect_total = x + residual if with_residual else x
    torch.testing.assert_close(total, expect_total)
    expect = F.rms_norm(expect_total, (n,), weight, 1e-6)
    torch.testing.assert_close(out, expect, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("rows,inter", [(1, 16), (32, 688), (300, 1536)])
def test_silu_mul_equals_torch(rows, inter):
    gen = torch.Generator().manual_seed(inter)
    gate_up = torch.randn(rows, 2 * inter, generator=gen) * 6
    gate_up[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(
        cpu_kernels.silu_mul(gate_up), F.silu(gate) * up, rtol=2e-6, atol=1e-6
    )


def test_nan_propagates():
    gate_up = torch.zeros(1, 8)
    gate_up[0, 0] = float("nan")
    assert cpu_kernels.silu_mul(gate_up)[0, 0].isnan()


def reference_attention(qkv, cos, sin, k_cache, v_cache, positions, tables, page_size, heads):
    """Rotary, the KV write and GQA attention with torch ops, one request at a time."""
    kv_heads, dim = k_cache.shape[1:]
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    q = RotaryEmbedding.apply(q.view(-1, heads, dim), cos[:, None], sin[:, None])
    k = RotaryEmbedding.apply(k.view(-1, kv_heads, dim), cos[:, None], sin[:, None])
    v = v.reshape(-1, kv_heads, dim)
    outs = []
    for b, position in enumerate(positions):
        span = torch.arange(position + 1)
        slots = tables[b][span // page_size] * page_size + span % page_size
        k_cache[slots[-1]], v_cache[slots[-1]] = k[b], v[b]
        keys = k_cache[slots].transpose(0, 1)[None]  # [1, Hkv, n, D]
        values = v_cache[slots].transpose(0, 1)[None]
        out = F.scaled_dot_product_attention(q[b][None, :, None], keys, values, enable_gqa=True)
        outs.append(out[0, :, 0])
    return torch.stack(outs)


@pytest.mark.parametrize(
    "heads,kv_heads,dim,page_size",
    [(8, 4, 32, 16), (12, 2, 128, 16), (9, 3, 64, 4), (4, 4, 16, 1)],
)
def test_decode_attention_equals_torch(heads, kv_heads, dim, page_size):
    rng = random.Random(heads * dim)
    gen = torch.Generator().manual_seed(dim)
    # Contexts from two tokens (a decode step continues a context) to several key blocks,
    # on shuffled pages.
    positions = [1, 2, 15, 16, 63, 64, 65, 200, 517]
    num_pages = sum(p // page_size + 1 for p in positions) + 3
    order = rng.sample(range(num_pages), num_pages)
    tables, used = [], 0
    for p in positions:
        count = p // page_size + 1
        tables.append(order[used : used + count])
        used += count
    slots = num_pages * page_size
    k_cache = torch.randn(slots, kv_heads, dim, generator=gen)
    v_cache = torch.randn(slots, kv_heads, dim, generator=gen)
    qkv = torch.randn(len(positions), (heads + 2 * kv_heads) * dim, generator=gen) * 2
    rotary = RotaryEmbedding(RopeConfig(), dim, 4096)
    cos, sin = rotary.cos_sin(torch.tensor(positions), torch.float32)
    cos, sin = cos[:, 0].contiguous(), sin[:, 0].contiguous()

    expect_k, expect_v = k_cache.clone(), v_cache.clone()
    expect = reference_attention(
        qkv,
        cos,
        sin,
        expect_k,
        expect_v,
        positions,
        [torch.tensor(t) for t in tables],
        page_size,
        heads,
    )
    chunks = [SeqChunk(p, 1, t) for p, t in zip(positions, tables, strict=True)]
    meta = AttentionMetadata.build(chunks, page_size, "cpu", paged_decode=True)
    out = cpu_kernels.decode_attention(
        qkv, cos, sin, k_cache, v_cache, meta.positions, meta.block_tables, page_size, heads
    )
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)
    # The new tokens' K and V went to their slots, and nothing else changed.
    torch.testing.assert_close(k_cache, expect_k, rtol=1e-6, atol=1e-6)
    assert torch.equal(v_cache, expect_v)


@pytest.mark.parametrize(
    "rope",
    [
        RopeConfig(),
        RopeConfig(
            theta=500000.0, rope_type="llama3", factor=8.0, original_max_position_embeddings=8192
        ),
        RopeConfig(theta=1e6, rope_type="yarn", factor=4.0, original_max_position_embeddings=4096),
    ],
)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_rotary_tables_equal_torch(rope, dtype):
    rotary = RotaryEmbedding(rope, 64, 32768)
    positions = torch.tensor([0, 1, 7, 100, 4095, 32000], dtype=dtype)
    cos, sin = rotary.cos_sin(positions, torch.float32)
    with cpu_kernels.torch_ops_only():
        expect_cos, expect_sin = rotary.cos_sin(positions, torch.float32)
    torch.testing.assert_close(cos, expect_cos, rtol=1e-6, atol=2e-6)
    torch.testing.assert_close(sin, expect_sin, rtol=1e-6, atol=2e-6)
