"""pdserve's compact model runner: Llama/Qwen2 decoder stages over a paged KV cache.

Names load on first use, so processes that hold no model (the ingress, the prefill controller)
can import a submodule such as `engine.tokenizer` without loading torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ModelLoadError": "engine.errors",
    "OutOfPagesError": "engine.errors",
    "PageAccountingError": "engine.errors",
    "UnsupportedModelError": "engine.errors",
    "AttentionMetadata": "engine.attention",
    "ChatTemplateError": "engine.tokenizer",
    "Completion": "engine.llm",
    "DecoderStage": "engine.model",
    "EngineConfig": "engine.engine_config",
    "KVCacheSpec": "engine.kv_cache",
    "KVLayerRegion": "engine.kv_cache",
    "LLM": "engine.llm",
    "LayerRange": "engine.layer_range",
    "ModelConfig": "engine.config",
    "ModelSettings": "engine.engine_config",
    "PageAllocator": "engine.page_allocator",
    "PageTable": "engine.page_allocator",
    "PagedKVCache": "engine.kv_cache",
    "RequestOutput": "engine.llm",
    "SamplingParams": "engine.sampling_params",
    "SeqChunk": "engine.attention",
    "StageRunner": "engine.runner",
    "Tokenizer": "engine.tokenizer",
    "load_stage": "engine.loader",
    "split_layers": "engine.layer_range",
}

__all__ = [
    "LLM",
    "AttentionMetadata",
    "ChatTemplateError",
    "Completion",
    "DecoderStage",
    "EngineConfig",
    "KVCacheSpec",
    "KVLayerRegion",
    "LayerRange",
    "ModelConfig",
    "ModelLoadError",
    "ModelSettings",
    "OutOfPagesError",
    "PageAccountingError",
    "PageAllocator",
    "PageTable",
    "PagedKVCache",
    "RequestOutput",
    "SamplingParams",
    "SeqChunk",
    "StageRunner",
    "Tokenizer",
    "UnsupportedModelError",
    "load_stage",
    "split_layers",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
