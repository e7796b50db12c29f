"""How a deployment configures an engine: its model settings and its engine's knobs.

A module of its own, free of torch, because the configs of every role are built and validated
in processes that hold no model (the `pdserve serve` driver, the prefill controller), and
travel from there to the engines.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, PositiveInt

CpuLinear = Literal["onednn", "mkl"]
"""How CPU linears run: "onednn" (prepacked weight, the default) or "mkl" (plain F.linear)."""

Role = Literal["both", "prefill", "decode"]
"""What steps an engine or stage runs, so which packed forms its CPU linears keep
(engine/linear.py): "both" (colocated), "prefill" (a PP stage of a prefill instance), "decode"
(a PD decode replica)."""


class ModelSettings(BaseModel):
    """What every role of a deployment shares about its model: declared once, here, and
    handed down (`AppConfig.engine`, `EngineConfig.model_copy(update=...)`)."""

    model: str = Field(description="local Hugging Face model directory or .gguf file")
    dtype: str = "auto"
    device: str = "auto"
    page_size: PositiveInt = 16


class EngineConfig(ModelSettings):
    """How one engine runs a model: where, in what precision, and with how much KV."""

    num_pages: PositiveInt | None = Field(
        None, description="KV pages; derived from kv_cache_gib if unset"
    )
    kv_cache_gib: float = Field(0.5, gt=0)
    max_num_seqs: PositiveInt = 64
    max_num_batched_tokens: PositiveInt = 2048
    max_model_len: PositiveInt | None = None
    cpu_linear: CpuLinear = Field(
        "onednn",
        description="CPU linears: on weights packed at load (oneDNN for prefill, native panels "
        "for decode), or plain F.linear (MKL, the kernel transformers uses; no packed copies)",
    )
    role: Role = Field(
        "both",
        description="the steps this engine runs, so the copies of its CPU linear weights it "
        "keeps: both (colocated: one for prefill, one for decode), decode (a PD decode replica: "
        "the decode copy only; a recompute after preemption prefills on it), prefill",
    )
    async_scheduling: bool | None = Field(
        None,
        description="overlap planning and output processing with the device's step (see "
        "engine/llm.py); None: on for CUDA, off for the CPU, where torch runs synchronously "
        "and there is nothing to overlap",
    )
