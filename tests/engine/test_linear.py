"""The prepacked linears: oneDNN's (prefill) and the native panels (decode), on by default,
opt-out-able, batch-invariant, and falling back to F.linear where they cannot run."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

import engine.linear
from engine import LLM, EngineConfig, cpu_kernels, load_stage
from engine.linear import Linear, pack_linears

needs_onednn = pytest.mark.skipif(
    not engine.linear.onednn_available(), reason="torch built without oneDNN"
)


def linears(stage) -> list[Linear]:
    return [m for m in stage.modules() if isinstance(m, Linear)]


@pytest.fixture
def panels(monkeypatch):
    """Decode on the panels whatever this CPU prefers (they are the AVX-512 machines' path)."""
    monkeypatch.setattr(cpu_kernels, "panels_pay", lambda: True)


@needs_onednn
def test_stages_pack_every_linear_by_default_and_mkl_opts_out(qwen2_dir, panels):
    packed = linears(load_stage(qwen2_dir))
    assert len(packed) == 4 * 4 + 1  # qkv, o, gate_up, down per layer, and the LM head
    assert all(m.packed is not None and m.panels is not None for m in packed)
    prefill_only = linears(load_stage(qwen2_dir, decode=False))
    assert all(m.packed is not None and m.panels is None for m in prefill_only)
    plain = linears(load_stage(qwen2_dir, cpu_linear="mkl"))
    assert all(m.packed is None and m.panels is None for m in plain)
    llm = LLM(EngineConfig(model=str(qwen2_dir), num_pages=8, cpu_linear="mkl"))
    assert all(m.packed is None and m.panels is None for m in linears(llm.runner.stage))


@needs_onednn
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_rounds_a_row_the_same_at_any_batch_size(bias):
    """What lets batched decode equal one-at-a-time decode bit for bit in the linears."""
    torch.manual_seed(0)
    layer = Linear(256, 688, bias=bias)
    assert pack_linears(layer) == 1
    x = torch.randn(300, 256)
    full = layer(x)
    for rows in (1, 2, 5, 17, 32, 64):
        assert torch.equal(layer(x[:rows]), full[:rows])
    # Same function as F.linear, up to float32 rounding.
    torch.testing.assert_close(full, F.linear(x, layer.weight, layer.bias))


@needs_onednn
def test_packed_linear_sees_only_bucketed_row_counts(monkeypatch):
    """oneDNN caches a kernel per shape: every call reaches it with a multiple of ROW_BUCKET
    rows (so a stage's native memory stops growing early), and the caller gets its own rows,
    in its own leading shape."""
    seen: list[int] = []
    real = engine.linear._onednn_linear

    def spy(x, *args):
        seen.append(x.shape[0])
        return real(x, *args)

    monkeypatch.setattr(engine.linear, "_onednn_linear", spy)
    layer = Linear(64, 96)
    pack_linears(layer)
    for shape in ((1, 64), (33, 64), (64, 64), (3, 5, 64)):
        x = torch.randn(shape)
        out = layer(x)
        assert out.shape == (*shape[:-1], 96)
        torch.testing.assert_close(out, F.linear(x, layer.weight, layer.bias))
    assert seen == [32, 64, 64, 32]


@needs_onednn
def test_without_panels_decode_runs_on_onednn_in_small_row_buckets(monkeypatch):
    """Where the panels do not pay (AVX2), decode packs none and runs on oneDNN's copy with rows
    padded to `decode_rows` (not to 32): same result as F.linear, the same at any batch."""
    monkeypatch.setattr(cpu_kernels, "panels_pay", lambda: False)
    seen: list[int] = []
    real = engine.linear._onednn_linear

    def spy(x, *args):
        seen.append(x.shape[0])
        return real(x, *args)

    monkeypatch.setattr(engine.linear, "_onednn_linear", spy)
    torch.manual_seed(0)
    layer = Linear(256, 688)
    pack_linears(layer)
    assert layer.panels is None and layer.packed is not None
    x = torch.randn(64, 256)
    full = layer.decode_forward(x)
    torch.testing.assert_close(full, F.linear(x, layer.weight, layer.bias))
    seen.clear()
    for rows in (1, 2, 3, 5, 8, 9, 17, 33):
        assert torch.equal(layer.decode_forward(x[:rows]), full[:rows])
    assert seen == [1, 2, 4, 8, 8, 16, 24, 40]


@pytest.mark.parametrize("n,k", [(1, 1), (7, 40), (32, 256), (100, 257), (688, 256)])
@pytest.mark.parametrize("bias", [False, True])
def test_decode_panels_equal_float64_and_round_a_row_the_same_at_any_batch_size(n, k, bias, panels):
    """The decode matmul (native, on the weight packed in panels): panel edges (n not a multiple
    of 32), register-tile edges (rows not a multiple of 6), any k."""
    torch.manual_seed(n * k)
    layer = Linear(k, n, bias=bias)
    pack_linears(layer)
    assert layer.panels is not None
    x = torch.randn(70, k)
    full = cpu_kernels.panel_linear(x, layer.panels, n, layer.bias)
    reference = F.linear(
        x.double(), layer.weight.double(), None if not bias else layer.bias.double()
    )
    torch.testing.assert_close(full, reference.float(), rtol=1e-5, atol=2e-6 * k**0.5)
    for rows in (1, 2, 5, 6, 7, 13, 32, 64):
        assert torch.equal(
            cpu_kernels.panel_linear(x[:rows], layer.panels, n, layer.bias), full[:rows]
        )


@pytest.mark.skipif(
    not engine.linear.onednn_available(torch.bfloat16), reason="no oneDNN bf16 on this CPU"
)
def test_bf16_linears_pack_too():
    torch.manual_seed(0)
    layer = Linear(256, 688, bias=True).to(torch.bfloat16)
    assert pack_linears(layer) == 1
    x = torch.randn(32, 256, dtype=torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, F.linear(x, layer.weight, layer.bias))


@needs_onednn
def test_moving_or_casting_drops_the_stale_pack(panels):
    layer = Linear(32, 16)
    pack_linears(layer)
    assert layer.panels is not None
    layer.to(torch.float64)
    assert layer.packed is None and layer.panels is None
    x = torch.randn(3, 32, dtype=torch.float64)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))


def test_falls_back_to_f_linear_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(engine.linear, "onednn_available", lambda dtype=torch.float32: False)
    monkeypatch.setattr(engine.linear, "_warned", set())
    model = torch.nn.Sequential(Linear(8, 8), Linear(8, 8))
    with caplog.at_level(logging.WARNING, logger="engine.linear"):
        assert pack_linears(model) == 0
        assert pack_linears(model) == 0
    assert len(caplog.records) == 1
    x = torch.randn(2, 8)
    torch.testing.assert_close(
        model(x),
        F.linear(F.linear(x, model[0].weight, model[0].bias), model[1].weight, model[1].bias),
    )


def test_unknown_mode_is_rejected():
    with pytest.raises(ValueError, match="cpu_linear"):
        pack_linears(Linear(4, 4), "blas")  # type: ignore[arg-type]
