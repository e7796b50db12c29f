"""Loading real checkpoint layouts, and clear errors for the ones we cannot load."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from engine import (
    LLM,
    EngineConfig,
    ModelConfig,
    ModelLoadError,
    Tokenizer,
    UnsupportedModelError,
    load_stage,
)
from engine.testmodel import corpus_text, make_test_model
from tests.engine.helpers import full_logits


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (path / "config.json").write_text(json.dumps(cfg))


def test_sharded_checkpoint_loads_the_same_model(tmp_path, llama_dir):
    sharded = make_test_model(tmp_path / "sharded", family="llama", seed=0, shards=3)
    assert (sharded / "model.safetensors.index.json").is_file()
    ids = torch.arange(5, 60)
    torch.testing.assert_close(
        full_logits([load_stage(sharded)], ids), full_logits([load_stage(llama_dir)], ids)
    )


def test_generated_model_is_deterministic_for_a_seed(tmp_path):
    def digest(path):
        return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir())}

    a = digest(make_test_model(tmp_path / "a", seed=5))
    b = digest(make_test_model(tmp_path / "b", seed=5))
    c = digest(make_test_model(tmp_path / "c", seed=6))
    assert a == b
    assert a["model.safetensors"] != c["model.safetensors"]
    assert a["tokenizer.json"] == c["tokenizer.json"]


def test_our_tokenizer_agrees_with_transformers(model_dir):
    ours = Tokenizer.from_dir(model_dir)
    theirs = AutoTokenizer.from_pretrained(model_dir)
    for line in [*corpus_text().splitlines()[:40], "  leading spaces", "ünïcödé 🚀", "a\n\nb"]:
        assert ours.encode(line) == theirs.encode(line), line
        assert ours.decode(ours.encode(line)) == line
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    assert ours.apply_chat_template(messages) == theirs.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )


def test_incremental_decoding_reassembles_multibyte_characters(llama_dir):
    tok = Tokenizer.from_dir(llama_dir)
    text = "naïve café 日本語 🚀 done"
    stream = tok.decode_stream()
    pieces = [stream.step(t) for t in tok.encode(text, add_special_tokens=False)]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_transformers5_layout_rope_parameters_and_chat_template_file(tmp_path, llama_dir):
    path = copy_model(llama_dir, tmp_path / "m")
    edit_config(
        path, rope_theta=None, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}
    )
    (path / "chat_template.jinja").write_text(
        "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    )
    assert ModelConfig.from_dir(path).rope.theta == 10000.0
    tok = Tokenizer.from_dir(path)
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "[x]"
    ids = torch.arange(5, 40)
    torch.testing.assert_close(
        full_logits([load_stage(path)], ids), full_logits([load_stage(llama_dir)], ids)
    )


def test_missing_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        ModelConfig.from_dir(tmp_path / "nope")


def test_missing_config(tmp_path, llama_dir):
    path = copy_model(llama_dir, tmp_path / "m")
    (path / "config.json").unlink()
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        load_stage(path)


def test_unsupported_architecture_is_named(tmp_path, llama_dir):
    path = copy_model(llama_dir, tmp_path / "m")
    edit_config(path, architectures=["GPT2LMHeadModel"])
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        load_stage(path)


def test_unsupported_rope_scaling_is_named(tmp_path, llama_dir):
    path = copy_model(llama_dir, tmp_path / "m")
    edit_config(path, rope_scaling={"rope_type": "longrope", "factor": 2.0})
    with pytest.raises(UnsupportedModelError, match="longrope"):
        load_stage(path)


def test_inconsistent_head_counts(tmp_path, llama_dir):
    path = copy_model(llama_dir, tmp_path / "m")
    edit_config(path, num_key_value_heads=3)
    with pytest.raises(ModelLoadError, match="multiple of num_key_value_heads"):
        load_stage(path)


def test_missing_required_field(tmp_path, llama_dir):
    path = copy_model(llama_dir, tmp_path / "m")
    edit_config(path, hidden_size=None)
    with pytest.raises(ModelLoadError, match="hidden_size"):
        load_stage(path)


def test_missing_weights(tmp_path, llama_dir):
    path = copy_model(llama_dir, tmp_path / "m")
    (path / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"no \*\.safetensors"):
        load_stage(path)


def test_missing_tensor_is_named(tmp_path, llama_dir):
    path = copy_model(llama_dir, tmp_path / "m")
    weights = load_file(path / "model.safetensors")
    del weights["model.layers.2.mlp.up_proj.weight"]
    save_file(weights, path / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"model\.layers\.2\.mlp\.up_proj\.weight"):
        load_stage(path)
    # A stage that does not own layer 2 does not care.
    from engine import LayerRange

    load_stage(path, LayerRange(0, 2))


def test_shape_mismatch_is_named(tmp_path, llama_dir):
    path = copy_model(llama_dir, tmp_path / "m")
    edit_config(path, intermediate_size=700)
    with pytest.raises(ModelLoadError, match="gate_proj"):
        load_stage(path)


def test_missing_shard_named_in_index(tmp_path):
    path = make_test_model(tmp_path / "m", shards=2)
    (path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="model-00002-of-00002"):
        load_stage(path)


def test_missing_tokenizer(tmp_path, llama_dir):
    path = copy_model(llama_dir, tmp_path / "m")
    (path / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match=r"tokenizer\.json"):
        LLM(EngineConfig(model=str(path), num_pages=8))


def test_corrupt_config_json(tmp_path, llama_dir):
    path = copy_model(llama_dir, tmp_path / "m")
    (path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        load_stage(path)
