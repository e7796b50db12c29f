"""Our model against the `transformers` implementation of the same checkpoint (float32)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import LLM, EngineConfig, SamplingParams, load_stage
from engine.testmodel import make_test_model
from tests.engine.helpers import full_logits

ROPE_VARIANTS = {
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 256,
    },
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512},
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
}


def hf_model(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def assert_logits_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    scale = ref.abs().max().item()
    err = (ours - ref).abs().max().item()
    assert err <= 1e-5 * max(scale, 1.0) + 1e-5, f"max abs error {err} (logit scale {scale})"


def test_logits_match_transformers(model_dir):
    ids = torch.randint(0, 600, (300,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf_model(model_dir)(ids[None]).logits[0]
    assert_logits_close(full_logits([load_stage(model_dir)], ids), ref)


@pytest.mark.parametrize("variant", sorted(ROPE_VARIANTS))
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_rope_scaling_variants_match_transformers(tmp_path, family, variant):
    path = make_test_model(
        tmp_path, family=family, seed=3, num_hidden_layers=2, rope_scaling=ROPE_VARIANTS[variant]
    )
    # Past the original context, so the scaled frequencies matter.
    ids = torch.randint(0, 600, (700,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf_model(path)(ids[None]).logits[0]
    assert_logits_close(full_logits([load_stage(path)], ids), ref)


def test_greedy_generation_matches_transformers_token_for_token(model_dir):
    llm = LLM(EngineConfig(model=str(model_dir), num_pages=64))
    hf = hf_model(model_dir)
    prompts = [
        "The capital of France is",
        "def fibonacci(n):",
        "Once upon a time, in a small village",
    ]
    for text in prompts:
        ids = llm.tokenizer.encode(text)
        [ours] = llm.generate([ids], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
        with torch.no_grad():
            out = hf.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.int64),
                max_new_tokens=24,
                min_new_tokens=24,
                do_sample=False,
                pad_token_id=llm.tokenizer.eos_token_ids[0],
            )
        assert ours.token_ids == out[0, len(ids) :].tolist(), text
    assert llm.allocator.num_in_use == 0
