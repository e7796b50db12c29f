"""Layer-range slices: a stage owns only its layers, and stages chained equal the whole model."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

import engine.loader
from engine import LayerRange, load_stage, split_layers
from tests.engine.helpers import full_logits


@pytest.mark.parametrize("num_stages", [2, 3, 4])
def test_stages_chained_give_the_whole_models_logits(model_dir, num_stages):
    ids = torch.randint(0, 600, (150,), generator=torch.Generator().manual_seed(2))
    whole = full_logits([load_stage(model_dir)], ids)
    stages = [load_stage(model_dir, r) for r in split_layers(4, num_stages)]
    split = full_logits(stages, ids)
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-5)


def test_split_layers_is_balanced_and_contiguous():
    assert split_layers(30, 4) == [
        LayerRange(0, 8),
        LayerRange(8, 16),
        LayerRange(16, 23),
        LayerRange(23, 30),
    ]
    with pytest.raises(ValueError):
        split_layers(4, 5)


def test_each_stage_reads_only_its_own_tensors(llama_dir, monkeypatch):
    read: list[str] = []

    class RecordingSafeOpen:
        def __init__(self, *args, **kwargs):
            self._inner = safe_open(*args, **kwargs)

        def __enter__(self):
            self._handle = self._inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self._inner.__exit__(*exc)

        def keys(self):
            return self._handle.keys()

        def get_tensor(self, name):
            read.append(name)
            return self._handle.get_tensor(name)

    monkeypatch.setattr(engine.loader, "safe_open", RecordingSafeOpen)
    middle = load_stage(llama_dir, LayerRange(1, 3))
    assert not hasattr(middle, "embed_tokens") and not hasattr(middle, "lm_head")
    assert {n.split(".")[2] for n in read} == {"1", "2"}
    assert all(n.startswith("model.layers.") for n in read)

    read.clear()
    first = load_stage(llama_dir, LayerRange(0, 1))
    assert hasattr(first, "embed_tokens") and not hasattr(first, "lm_head")
    assert "model.embed_tokens.weight" in read and "lm_head.weight" not in read

    read.clear()
    last = load_stage(llama_dir, LayerRange(3, 4))
    assert hasattr(last, "lm_head") and not hasattr(last, "embed_tokens")
    assert {"model.norm.weight", "lm_head.weight"} <= set(read)
    assert "model.embed_tokens.weight" not in read


def test_tied_last_stage_loads_the_embedding_as_its_head(qwen2_dir):
    # mkl: the plain weights stay (packing drops them, but for the embedding's lookup).
    last = load_stage(qwen2_dir, LayerRange(2, 4), cpu_linear="mkl")
    whole = load_stage(qwen2_dir)
    torch.testing.assert_close(last.lm_head.weight, whole.embed_tokens.weight)


def test_middle_stage_maps_hidden_states_to_hidden_states(llama_dir):
    stage = load_stage(llama_dir, LayerRange(1, 2))
    ids = torch.randint(0, 600, (20,))
    first = load_stage(llama_dir, LayerRange(0, 1))
    h = full_logits([first], ids)
    out = full_logits([stage], h)
    assert out.shape == (20, stage.config.hidden_size)
