"""The native CPU kernels in bfloat16 against their float32 twins, and `dtype="auto"` on the CPU.

bf16 weights and KV widen exactly to float32, so each bf16 kernel has a float32 twin on the
widened values: the matmul equals it bit for bit where it widens the weights for FMAs (AVX2,
this machine) and to float32 rounding where it multiplies bf16 pairs (AVX512-BF16); kernels
with bf16 results equal it rounded once. `cpu_kernels.selfcheck` is the quick form of these
that runs anywhere (`python -m engine.cpu_kernels --selfcheck`).
"""

from __future__ import annotations

import logging
import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F

import engine.runner
from engine import cpu_kernels
from engine.attention import AttentionMetadata, SeqChunk
from engine.config import RopeConfig
from engine.rotary import RotaryEmbedding
from engine.runner import cpu_bf16_choice, resolve_dtype
from tests.engine.test_cpu_kernels import reference_attention

CPU = torch.device("cpu")


def test_selfcheck_passes_here():
    errors = cpu_kernels.selfcheck()
    assert set(errors) >= {"panel_linear", "rms_norm", "silu_mul", "decode_attention"}


@pytest.mark.skipif(shutil.which("gcc") is None, reason="no gcc")
def test_the_avx512_bf16_path_compiles(tmp_path):
    """This machine may lack AVX512-BF16, so the `vdpbf16ps` path is compiled (not run) for it:
    a typo there fails here rather than on the first machine that has it."""
    flags = [f for f in cpu_kernels.FLAGS if f not in ("-march=native", "-shared")]
    isa = ["-mavx512f", "-mavx512bf16", "-mavx512bw", "-mavx512vl"]
    out = tmp_path / "cpu_decode.o"
    done = subprocess.run(
        [
            "gcc",
            *flags,
            *isa,
            "-Werror=implicit-function-declaration",
            "-c",
            str(cpu_kernels.SOURCE),
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    symbols = subprocess.run(["nm", str(out)], capture_output=True, text=True).stdout
    assert "pd_panel_linear_bf16" in symbols


def widened_panels_twin(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """The float32 panel matmul on the bf16 weight widened, and on x as the bf16 one reads it."""
    if cpu_kernels.bf16_dot_products():
        x = x.bfloat16().float()
    packed = cpu_kernels.pack_panels(weight.float())
    return cpu_kernels.panel_linear(
        x, packed, weight.shape[0], None if bias is None else bias.float()
    )


@pytest.mark.parametrize("n,k", [(1, 1), (7, 40), (32, 256), (100, 257), (688, 576)])
@pytest.mark.parametrize("bias", [False, True])
def test_bf16_panels_equal_the_float32_panels_at_any_batch_size(n, k, bias):
    gen = torch.Generator().manual_seed(n * k)
    weight = torch.randn(n, k, generator=gen).bfloat16()
    b = torch.randn(n, generator=gen).bfloat16() if bias else None
    packed = cpu_kernels.pack_panels(weight)
    assert packed.dtype == torch.bfloat16 and packed.numel() * 2 < weight.numel() * 2 + 4 * 32 * k
    x = torch.randn(70, k, generator=gen)
    full = cpu_kernels.panel_linear(x, packed, n, b)
    want = widened_panels_twin(x, weight, b)
    if cpu_kernels.bf16_dot_products():
        torch.testing.assert_close(full, want, rtol=1e-5, atol=2e-6 * k**0.5)
    else:
        assert torch.equal(full, want)
    for rows in (1, 2, 5, 6, 7, 13, 32, 64):
        assert torch.equal(cpu_kernels.panel_linear(x[:rows], packed, n, b), full[:rows])


@pytest.mark.parametrize("rows,n", [(1, 64), (32, 576), (300, 960)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_bf16_rms_norm_is_the_float32_norm_of_the_rounded_sum_rounded_once(rows, n, with_residual):
    gen = torch.Generator().manual_seed(rows + n)
    x = (torch.randn(rows, n, generator=gen) * 3).bfloat16()
    residual = torch.randn(rows, n, generator=gen).bfloat16() if with_residual else None
    weight = torch.randn(n, generator=gen).bfloat16()
    out, total = cpu_kernels.rms_norm(x, weight, 1e-6, residual)
    assert out.dtype == total.dtype == torch.bfloat16
    expect_total = (x.float() + residual.float()).bfloat16() if with_residual else x
    assert torch.equal(total, expect_total)
    expect, _ = cpu_kernels.rms_norm(expect_total.float(), weight.float(), 1e-6, None)
    assert torch.equal(out, expect.bfloat16())
    # Against torch's float32 norm: one bf16 rounding.
    torch.testing.assert_close(
        out.float(),
        F.rms_norm(expect_total.float(), (n,), weight.float(), 1e-6),
        rtol=2**-8,
        atol=1e-6,
    )


def test_a_decode_steps_norm_takes_float32_activations_and_a_bf16_weight():
    gen = torch.Generator().manual_seed(0)
    x, residual = torch.randn(8, 576, generator=gen), torch.randn(8, 576, generator=gen)
    weight = torch.randn(576, generator=gen).bfloat16()
    out, total = cpu_kernels.rms_norm(x, weight, 1e-5, residual)
    assert out.dtype == torch.float32
    expect, expect_total = cpu_kernels.rms_norm(x, weight.float(), 1e-5, residual)
    assert torch.equal(out, expect) and torch.equal(total, expect_total)


@pytest.mark.parametrize("rows,inter", [(1, 16), (32, 688), (300, 1536)])
def test_bf16_silu_mul_is_the_float32_one_rounded_once(rows, inter):
    gen = torch.Generator().manual_seed(inter)
    gate_up = (torch.randn(rows, 2 * inter, generator=gen) * 6).bfloat16()
    gate_up[0, :4] = torch.tensor([-100.0, 100.0, 0.0, float("nan")])
    out = cpu_kernels.silu_mul(gate_up)
    assert out.dtype == torch.bfloat16 and out[0, 3].isnan()
    expect = cpu_kernels.silu_mul(gate_up.float()).bfloat16()
    assert torch.equal(out[:, :3], expect[:, :3]) and torch.equal(out[1:], expect[1:])
    gate, up = gate_up.float().chunk(2, dim=-1)
    torch.testing.assert_close(
        out.float(), F.silu(gate) * up, rtol=2**-8, atol=1e-6, equal_nan=True
    )


@pytest.mark.parametrize(
    "heads,kv_heads,dim,page_size",
    [(8, 4, 32, 16), (12, 2, 128, 16), (9, 3, 64, 4), (4, 4, 16, 1)],
)
def test_bf16_decode_attention_reads_and_writes_a_bf16_cache(heads, kv_heads, dim, page_size):
    """The new token's K (after rotary, in float32) and V are written rounded to bf16 and
    nothing else changes; the output is torch's float32 attention over the widened cache it leaves."""
    gen = torch.Generator().manual_seed(dim)
    positions = [1, 2, 15, 16, 63, 64, 65, 200, 517]
    tables, used = [], 0
    for p in positions:
        count = p // page_size + 1
        tables.append(list(range(used + count - 1, used - 1, -1)))  # pages in reverse
        used += count
    slots = used * page_size
    k_cache = torch.randn(slots, kv_heads, dim, generator=gen).bfloat16()
    v_cache = torch.randn(slots, kv_heads, dim, generator=gen).bfloat16()
    qkv = torch.randn(len(positions), (heads + 2 * kv_heads) * dim, generator=gen) * 2
    rotary = RotaryEmbedding(RopeConfig(), dim, 4096)
    cos, sin = rotary.cos_sin(torch.tensor(positions), torch.float32)
    cos, sin = cos[:, 0].contiguous(), sin[:, 0].contiguous()
    expect_k, expect_v = k_cache.float(), v_cache.float()
    reference_attention(
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
    assert torch.equal(v_cache, expect_v.bfloat16())
    # K within one bf16 step: torch's rotary may round its float32 sum differently (FMA).
    torch.testing.assert_close(k_cache.float(), expect_k.bfloat16().float(), rtol=2**-7, atol=0)
    assert out.dtype == torch.float32
    q = RotaryEmbedding.apply(
        qkv[:, : heads * dim].view(-1, heads, dim), cos[:, None], sin[:, None]
    )
    for b, position in enumerate(positions):
        span = torch.arange(position + 1)
        slot = torch.tensor(tables[b])[span // page_size] * page_size + span % page_size
        keys, values = (c[slot].float().transpose(0, 1)[None] for c in (k_cache, v_cache))
        expect = F.scaled_dot_product_attention(q[b][None, :, None], keys, values, enable_gqa=True)
        torch.testing.assert_close(out[b], expect[0, :, 0], rtol=1e-5, atol=1e-5)


@pytest.fixture
def cpu_flags(monkeypatch):
    """Sets what `dtype="auto"` sees of the CPU: its flags and whether oneDNN has bf16."""

    def set_flags(flags: set[str] | None, onednn_bf16: bool) -> None:
        monkeypatch.setattr(engine.runner, "_cpu_flags", lambda: flags)
        monkeypatch.setattr(engine.runner, "onednn_available", lambda dtype: onednn_bf16)
        cpu_bf16_choice.cache_clear()

    yield set_flags
    cpu_bf16_choice.cache_clear()


@pytest.mark.parametrize(
    "flags,onednn_bf16,expect",
    [
        ({"avx2", "avx512f", "avx512_bf16"}, True, torch.bfloat16),
        ({"avx2", "amx_bf16", "amx_tile"}, True, torch.bfloat16),
        ({"avx2", "fma"}, False, torch.float32),  # AVX2: bf16 emulated, slower
        ({"avx2", "avx512f", "avx512bw"}, True, torch.float32),  # oneDNN emulates bf16 there
        ({"avx512_bf16"}, False, torch.float32),  # a torch without oneDNN bf16
        (None, True, torch.bfloat16),  # no /proc/cpuinfo: torch's own check decides
    ],
)
def test_auto_is_bf16_where_the_cpu_has_bf16_arithmetic(cpu_flags, flags, onednn_bf16, expect):
    cpu_flags(flags, onednn_bf16)
    assert resolve_dtype("auto", CPU) == expect


def test_an_explicit_dtype_overrides_auto_and_the_choice_is_logged_once(cpu_flags, caplog):
    cpu_flags({"avx2"}, False)
    with caplog.at_level(logging.INFO, logger="engine.runner"):
        assert resolve_dtype("auto", CPU) == torch.float32
        assert resolve_dtype("auto", CPU) == torch.float32
        assert resolve_dtype("bfloat16", CPU) == torch.bfloat16
    [record] = caplog.records
    assert "float32" in record.getMessage() and "avx512_bf16" in record.getMessage()
    cpu_flags({"amx_bf16"}, True)
    assert resolve_dtype("float32", CPU) == torch.float32
