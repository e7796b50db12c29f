"""pdserve's compact model runner: Llama/Qwen2 decoder stages over a paged KV cache."""

from engine.attention import AttentionMetadata, SeqChunk
from engine.config import ModelConfig
from engine.errors import (
    ModelLoadError,
    OutOfPagesError,
    PageAccountingError,
    UnsupportedModelError,
)
from engine.kv_cache import KVCacheSpec, KVLayerRegion, PagedKVCache
from engine.llm import LLM, Completion, EngineConfig, ModelSettings, RequestOutput
from engine.loader import load_stage
from engine.model import DecoderStage, LayerRange, split_layers
from engine.page_allocator import PageAllocator, PageTable
from engine.runner import StageRunner
from engine.sampling import SamplingParams
from engine.tokenizer import ChatTemplateError, Tokenizer

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
