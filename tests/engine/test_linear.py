"""The prepacked linears: oneDNN's (prefill) and the native panels (decode), on by default,
one copy of each weight in the form the engine's role reads, opt-out-able, batch-invariant, and
falling back to the panels or F.linear where oneDNN cannot run."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

import engine.linear
from engine import LLM, EngineConfig, SamplingParams, cpu_kernels, load_stage
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


def forms(linear: Linear) -> set[str]:
    """The copies of its weight a linear holds."""
    held = {"plain"} if not linear.weight.is_meta else set()
    return held | {name for name in ("packed", "panels") if getattr(linear, name) is not None}


@needs_onednn
@pytest.mark.parametrize(
    "pay,role,layer_forms,head_forms",
    [
        # AVX-512: decode on the panels, prefill on oneDNN.
        (True, "both", {"packed", "panels"}, {"panels"}),
        (True, "prefill", {"packed"}, {"panels"}),
        (True, "decode", {"panels"}, {"panels"}),
        # AVX2 (float32): both paths on oneDNN's copy.
        (False, "both", {"packed"}, {"packed"}),
        (False, "prefill", {"packed"}, {"packed"}),
        (False, "decode", {"packed"}, {"packed"}),
    ],
)
def test_each_role_keeps_one_copy_of_a_weight_per_path_it_runs(
    monkeypatch, qwen2_dir, pay, role, layer_forms, head_forms
):
    monkeypatch.setattr(cpu_kernels, "panels_pay", lambda: pay)
    stage = load_stage(qwen2_dir, role=role)
    *layers, head = linears(stage)
    assert len(layers) == 4 * 4 and head is stage.lm_head  # qkv, o, gate_up, down per layer
    assert all(forms(m) == layer_forms for m in layers)
    # The LM head sees only the logit rows: decode's copy alone, whatever the role.
    assert forms(head) == head_forms
    # The plain weights are gone but their shapes and dtypes stay; the tied embedding stays.
    assert head.weight.shape == (stage.config.vocab_size, stage.config.hidden_size)
    assert head.weight.dtype == torch.float32 and not stage.embed_tokens.weight.is_meta
    llm = LLM(
        EngineConfig(model=str(qwen2_dir), num_pages=8, dtype="float32", role=role, device="cpu")
    )
    assert all(forms(m) == layer_forms for m in linears(llm.runner.stage)[:-1])


def test_a_bf16_model_decodes_on_bf16_panels_in_every_role(qwen2_dir):
    """Without oneDNN bf16 (AVX2) the panels are bf16's only fast path, prefill's too; with it
    (AVX512-BF16, AMX) prefill runs on oneDNN's bf16 copy."""
    onednn = engine.linear.onednn_available(torch.bfloat16)
    for role in ("both", "prefill", "decode"):
        *layers, head = linears(load_stage(qwen2_dir, dtype=torch.bfloat16, role=role))
        for m in layers:
            assert m.weight.dtype == torch.bfloat16
            if m.panels is not None:
                assert m.panels.dtype == torch.bfloat16
            assert ("panels" in forms(m)) == (role != "prefill" or not onednn)
        assert forms(head) == {"panels"}


def test_a_prefill_stage_is_role_prefill(qwen2_dir):
    """`decode=False` (what cluster/stage_actor.py passes) is the prefill role."""
    stage = load_stage(qwen2_dir, decode=False)
    assert [forms(m) for m in linears(stage)] == [
        forms(m) for m in linears(load_stage(qwen2_dir, role="prefill"))
    ]


def test_mkl_keeps_the_plain_weight_only(qwen2_dir):
    plain = linears(load_stage(qwen2_dir, cpu_linear="mkl"))
    assert all(forms(m) == {"plain"} for m in plain)
    llm = LLM(EngineConfig(model=str(qwen2_dir), num_pages=8, cpu_linear="mkl", device="cpu"))
    assert all(forms(m) == {"plain"} for m in linears(llm.runner.stage))


@pytest.mark.parametrize("role", ["both", "prefill", "decode"])
def test_every_role_prefills_and_decodes_alike(qwen2_dir, role):
    """A decode engine recomputing a preempted request prefills on its panels; a prefill stage
    of a bf16 model where oneDNN has no bf16 (AVX2) too: the engine runs any step in any role."""
    prompts = [[5, 17, 99, 300], [7, 8, 9]]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    config = EngineConfig(model=str(qwen2_dir), num_pages=16, dtype="float32", device="cpu")
    expect = LLM(config.model_copy(update={"cpu_linear": "mkl"}))
    llm = LLM(config.model_copy(update={"role": role}))
    want = [c.token_ids for c in expect.generate(prompts, params)]
    assert [c.token_ids for c in llm.generate(prompts, params)] == want


@needs_onednn
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_rounds_a_row_the_same_at_any_batch_size(bias):
    """What lets batched decode equal one-at-a-time decode bit for bit in the linears."""
    torch.manual_seed(0)
    layer = Linear(256, 688, bias=bias)
    weight = layer.weight.detach().clone()
    assert pack_linears(layer) == 1
    x = torch.randn(300, 256)
    full = layer(x)
    for rows in (1, 2, 5, 17, 32, 64):
        assert torch.equal(layer(x[:rows]), full[:rows])
    # Same function as F.linear, up to float32 rounding.
    torch.testing.assert_close(full, F.linear(x, weight, layer.bias))


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
    weight = layer.weight.detach().clone()
    pack_linears(layer)
    for shape in ((1, 64), (33, 64), (64, 64), (3, 5, 64)):
        x = torch.randn(shape)
        out = layer(x)
        assert out.shape == (*shape[:-1], 96)
        torch.testing.assert_close(out, F.linear(x, weight, layer.bias))
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
    weight = layer.weight.detach().clone()
    pack_linears(layer)
    assert layer.panels is None and layer.packed is not None
    x = torch.randn(64, 256)
    full = layer.decode_forward(x)
    torch.testing.assert_close(full, F.linear(x, weight, layer.bias))
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
    weight = layer.weight.detach().clone()
    pack_linears(layer)
    assert layer.panels is not None
    x = torch.randn(70, k)
    full = cpu_kernels.panel_linear(x, layer.panels, n, layer.bias)
    reference = F.linear(x.double(), weight.double(), None if not bias else layer.bias.double())
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
    weight = layer.weight.detach().clone()
    assert pack_linears(layer) == 1
    x = torch.randn(32, 256, dtype=torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, F.linear(x, weight, layer.bias))


def test_moving_or_casting_a_packed_linear_is_refused_and_a_plain_one_moves():
    layer = Linear(32, 16)
    pack_linears(layer)
    with pytest.raises(RuntimeError, match="plain weight was dropped"):
        layer.to(torch.float64)
    plain = Linear(32, 16)
    pack_linears(plain, "mkl")
    plain.to(torch.float64)
    x = torch.randn(3, 32, dtype=torch.float64)
    torch.testing.assert_close(plain(x), F.linear(x, plain.weight, plain.bias))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_without_onednn_prefill_runs_on_the_panels_with_one_warning(monkeypatch, caplog, dtype):
    """Where oneDNN cannot pack the dtype (bf16 on AVX2, several times slower in F.linear than
    float32) the panels run prefill: the same function, one copy of the weight."""
    monkeypatch.setattr(engine.linear, "onednn_available", lambda dtype=torch.float32: False)
    monkeypatch.setattr(engine.linear, "_warned", set())
    torch.manual_seed(0)
    model = torch.nn.Sequential(Linear(40, 72, bias=True), Linear(72, 8)).to(dtype)
    weights = [(m.weight.detach().clone(), m.bias) for m in model]
    with caplog.at_level(logging.WARNING, logger="engine.linear"):
        assert pack_linears(model, role="prefill") == 0
        assert pack_linears(model, role="prefill") == 0  # packed before: left as it is
    assert len(caplog.records) == 1
    assert all(forms(m) == {"panels"} for m in model)
    x = torch.randn(50, 40, dtype=dtype)
    expect = x
    for weight, bias in weights:  # F.linear in float32 on the same values, then rounded
        expect = F.linear(expect.float(), weight.float(), None if bias is None else bias.float())
        expect = expect.to(dtype)
    torch.testing.assert_close(model(x), expect)


def test_without_onednn_or_native_kernels_falls_back_to_f_linear(monkeypatch):
    monkeypatch.setattr(engine.linear, "onednn_available", lambda dtype=torch.float32: False)
    model = torch.nn.Sequential(Linear(8, 8), Linear(8, 8))
    with cpu_kernels.torch_ops_only():
        assert pack_linears(model) == 0
    assert all(forms(m) == {"plain"} for m in model)
    x = torch.randn(2, 8)
    torch.testing.assert_close(
        model(x),
        F.linear(F.linear(x, model[0].weight, model[0].bias), model[1].weight, model[1].bias),
    )


def test_unknown_mode_is_rejected():
    with pytest.raises(ValueError, match="cpu_linear"):
        pack_linears(Linear(4, 4), "blas")  # type: ignore[arg-type]
