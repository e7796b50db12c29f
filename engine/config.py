"""Model configuration: the subset of a Hugging Face `config.json` the engine runs on.

Parsing happens once, at the edge, into a frozen dataclass; everything downstream trusts it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import ModelLoadError, UnsupportedModelError

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters, normalised from `rope_theta`/`rope_scaling` or `rope_parameters`."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    # yarn
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    @classmethod
    def from_hf(cls, raw: dict[str, Any]) -> RopeConfig:
        params = dict(raw.get("rope_parameters") or {})
        scaling = raw.get("rope_scaling") or {}
        params.update({k: v for k, v in scaling.items() if k not in params})
        theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
        rope_type = params.get("rope_type", params.get("type", "default")) or "default"
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"rope scaling type {rope_type!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
            )
        optional = {
            "original_max_position_embeddings": int,
            "low_freq_factor": float,
            "high_freq_factor": float,
            "beta_fast": float,
            "beta_slow": float,
            "attention_factor": float,
            "mscale": float,
            "mscale_all_dim": float,
            "truncate": bool,
        }
        kwargs = {k: conv(params[k]) for k, conv in optional.items() if params.get(k) is not None}
        return cls(
            theta=theta, rope_type=rope_type, factor=float(params.get("factor", 1.0)), **kwargs
        )


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Llama/Qwen2-family decoder."""

    family: str
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope: RopeConfig = field(default_factory=RopeConfig)
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    torch_dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        archs = raw.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            named = ", ".join(archs) if archs else f"model_type={raw.get('model_type')!r}"
            raise UnsupportedModelError(
                f"unsupported architecture {named}; pdserve runs "
                f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
            )
        family = SUPPORTED_ARCHITECTURES[arch]
        required = [
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
        ]
        missing = [k for k in required if k not in raw]
        if missing:
            raise ModelLoadError(f"config.json lacks required field(s): {', '.join(missing)}")
        heads = int(raw["num_attention_heads"])
        kv_heads = int(raw.get("num_key_value_heads") or heads)
        hidden = int(raw["hidden_size"])
        head_dim = int(raw.get("head_dim") or hidden // heads)
        if heads % kv_heads:
            raise ModelLoadError(
                f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}"
            )
        for name in required:
            if int(raw[name]) <= 0:
                raise ModelLoadError(f"config.json field {name} must be positive, got {raw[name]}")
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        dtype = raw.get("torch_dtype") or raw.get("dtype") or "float32"
        return cls(
            family=family,
            architecture=arch,
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_hidden_layers=int(raw["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope=RopeConfig.from_hf(raw),
            # Qwen2 always carries q/k/v biases; Llama only when `attention_bias` says so.
            attention_bias=family == "qwen2" or bool(raw.get("attention_bias", False)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            torch_dtype=str(dtype),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=tuple(int(e) for e in eos_ids),
        )

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        """From a Hugging Face directory's config.json, or a GGUF file's metadata."""
        from engine.gguf import config_from_gguf, find_gguf

        path = Path(model_dir)
        if (gguf_file := find_gguf(path)) is not None:
            return config_from_gguf(gguf_file)
        if not path.is_dir():
            what = "is not a GGUF file" if path.is_file() else "does not exist"
            raise ModelLoadError(f"model directory {str(path)!r} {what}")
        cfg = path / "config.json"
        if not cfg.is_file():
            raise ModelLoadError(
                f"{str(path)!r} has no config.json and no .gguf file; "
                "is it a Hugging Face model directory?"
            )
        try:
            raw = json.loads(cfg.read_text())
        except json.JSONDecodeError as exc:
            raise ModelLoadError(f"{cfg} is not valid JSON: {exc}") from exc
        return cls.from_dict(raw)
