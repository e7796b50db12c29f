"""A pipeline stage of a Llama/Qwen2 decoder: layers `[start, end)` plus the ends it owns.

The first stage owns the token embedding, the last the final norm and LM head; the whole model
is the one-stage case. A stage maps token ids (first) or hidden states (others) to hidden
states (non-last) or logits of the rows the metadata asks for (last).
"""

from __future__ import annotations

import torch
from torch import nn

from engine.attention import AttentionMetadata
from engine.config import ModelConfig
from engine.cpu_decode import CpuDecodeLayers
from engine.kv_cache import PagedKVCache
from engine.layer_range import LayerRange
from engine.layers import DecoderLayer, RMSNorm
from engine.linear import Linear
from engine.rotary import RotaryEmbedding


class DecoderStage(nn.Module):
    def __init__(self, config: ModelConfig, layer_range: LayerRange | None = None) -> None:
        super().__init__()
        layer_range = layer_range or LayerRange(0, config.num_hidden_layers)
        if layer_range.end > config.num_hidden_layers:
            raise ValueError(
                f"layer range [{layer_range.start}, {layer_range.end}) exceeds the model's "
                f"{config.num_hidden_layers} layers"
            )
        self.config = config
        self.layer_range = layer_range
        self.is_first = layer_range.start == 0
        self.is_last = layer_range.end == config.num_hidden_layers
        if self.is_first:
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(len(layer_range)))
        if self.is_last:
            self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
            self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(config.rope, config.head_dim, config.max_position_embeddings)
        self._cpu_decode: CpuDecodeLayers | None = None  # built on the first CPU decode step

    def _apply(self, fn, recurse: bool = True):
        self._cpu_decode = None  # it holds the layers' tensors of before
        return super()._apply(fn, recurse)

    @torch.inference_mode()
    def forward(
        self, inputs: torch.Tensor, meta: AttentionMetadata, kv_cache: PagedKVCache
    ) -> torch.Tensor:
        h = self.embed_tokens(inputs) if self.is_first else inputs
        # The Triton rotary kernel takes float32 cos/sin; the torch path rotates in h's dtype.
        cos, sin = self.rotary.cos_sin(meta.positions, torch.float32 if h.is_cuda else h.dtype)
        head = self.lm_head if self.is_last else None
        if meta.block_tables is not None and not h.is_cuda:  # CPU decode, pages read in place
            if self._cpu_decode is None:
                self._cpu_decode = CpuDecodeLayers(self.layers, head)
            h, residual = self._cpu_decode(h, cos, sin, meta, kv_cache)
            head = self._cpu_decode.lm_head
        else:
            residual = None
            for i, layer in enumerate(self.layers):
                h, residual = layer(h, residual, cos, sin, kv_cache.flat_kv(i), meta)
        if head is None:
            return h + residual
        # Logit rows are increasing, so as many as there are tokens means every row (decode).
        if meta.logits_indices.shape[0] != h.shape[0]:
            h, residual = h[meta.logits_indices], residual[meta.logits_indices]
        return head(self.norm(h, residual)[0]).float()
