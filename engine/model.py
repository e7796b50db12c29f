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
from engine.cpu_decode import CpuDecodeLayers, float32_matmul
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
            # Only ever sees the logit rows: decode-sized matmuls, on decode's copy (linear.py).
            self.lm_head = Linear(
                config.hidden_size, config.vocab_size, bias=False, logit_rows=True
            )
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
        dtype = h.dtype
        native_decode = meta.block_tables is not None and not h.is_cuda  # pages read in place
        # The Triton rotary kernel and the native decode take float32 cos/sin; the torch path
        # rotates in h's dtype.
        rotary_dtype = torch.float32 if h.is_cuda or native_decode else dtype
        cos, sin = self.rotary.cos_sin(meta.positions, rotary_dtype)
        head = None
        if self.is_last:  # on the CPU float32 logits, also of a bf16 model (engine/linear.py)
            head = self.lm_head if h.is_cuda else float32_matmul(self.lm_head)
        if native_decode:  # float32 activations out, whatever the model's dtype
            if self._cpu_decode is None:
                self._cpu_decode = CpuDecodeLayers(self.layers)
            h, residual = self._cpu_decode(h, cos, sin, meta, kv_cache)
        else:
            residual = None
            for i, layer in enumerate(self.layers):
                h, residual = layer(h, residual, cos, sin, kv_cache.flat_kv(i), meta)
        if head is None:
            return (h + residual).to(dtype)  # hidden states cross stages in the model's dtype
        # Logit rows are increasing, so as many as there are tokens means every row (decode).
        if meta.logits_indices.shape[0] != h.shape[0]:
            h, residual = h[meta.logits_indices], residual[meta.logits_indices]
        return head(self.norm(h, residual)[0]).float()
