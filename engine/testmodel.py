"""A small generated checkpoint in Hugging Face format: random weights, a real BPE tokenizer.

No model hub is reachable from our machines, so tests, `make serve` and benchmarks use a model
the project writes itself: Llama or Qwen2 architecture, deterministic for a seed, written in
seconds, loadable by pdserve and by `transformers` alike. For GPU benchmarks of realistic size,
`random_stage` builds a stage of one of `REALISTIC_SHAPES` with random weights made on the
device itself (no checkpoint: 16 GB of weights would take longer to write than to run).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file
from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

from engine.config import ModelConfig, RopeConfig
from engine.layer_range import LayerRange
from engine.model import DecoderStage
from engine.rotary import RotaryEmbedding

Family = Literal["llama", "qwen2"]

_LLAMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPECIAL = {
    "llama": {
        "bos": "<|begin_of_text|>",
        "eos": "<|eot_id|>",
        "others": ["<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>"],
        "template": _LLAMA_CHAT_TEMPLATE,
    },
    "qwen2": {
        "bos": None,
        "eos": "<|im_end|>",
        "others": ["<|endoftext|>", "<|im_start|>"],
        "template": _CHATML_TEMPLATE,
    },
}


def corpus_text() -> str:
    return resources.files("engine").joinpath("data/corpus.txt").read_text(encoding="utf-8")


def train_tokenizer(family: Family, vocab_size: int = 640) -> Tokenizer:
    """Byte-level BPE trained on the shipped corpus: any text encodes, nothing is unknown."""
    special = _SPECIAL[family]
    specials = [t for t in [special["bos"], special["eos"], *special["others"]] if t]
    tok = Tokenizer(models.BPE())
    if family == "qwen2":
        # Qwen2's own pre-tokenization, as its tokenizer.json (and transformers) define it.
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_text().splitlines(keepends=True), trainer=trainer)
    if special["bos"]:
        bos = special["bos"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A",
            pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, tok.token_to_id(bos))],
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def model_config(
    family: Family, vocab_size: int, tok: Tokenizer, **overrides: Any
) -> dict[str, Any]:
    special = _SPECIAL[family]
    eos_id = tok.token_to_id(special["eos"])
    cfg: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": 256,
        "intermediate_size": 688,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 32,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "torch_dtype": "float32",
        "eos_token_id": eos_id,
        "initializer_range": 0.02,
    }
    if family == "llama":
        cfg |= {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "rope_theta": 10000.0,
            "attention_bias": False,
            "mlp_bias": False,
            "tie_word_embeddings": False,
            "bos_token_id": tok.token_to_id(special["bos"]),
        }
    else:
        cfg |= {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "rope_theta": 1000000.0,
            "tie_word_embeddings": True,
            "use_sliding_window": False,
            "sliding_window": None,
            "max_window_layers": cfg["num_hidden_layers"],
        }
    cfg |= overrides
    return cfg


def random_weights(cfg: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    heads, kv_heads, head_dim = (
        cfg["num_attention_heads"],
        cfg["num_key_value_heads"],
        cfg["head_dim"],
    )
    qwen = cfg["model_type"] == "qwen2"

    def normal(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    def norm_weight() -> torch.Tensor:
        # Not all ones, so a norm applied to the wrong tensor changes the logits.
        return 1.0 + normal(hidden, std=0.1)

    std = hidden**-0.5
    # Tied embeddings double as the LM head: keep them small enough for moderate logits.
    embed_std = 0.25 if cfg["tie_word_embeddings"] else 1.0
    w = {"model.embed_tokens.weight": normal(cfg["vocab_size"], hidden, std=embed_std)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        # Larger q/k weights give sharp attention, so masking or position bugs show in the logits.
        w[p + "self_attn.q_proj.weight"] = normal(heads * head_dim, hidden, std=3 * std)
        w[p + "self_attn.k_proj.weight"] = normal(kv_heads * head_dim, hidden, std=3 * std)
        w[p + "self_attn.v_proj.weight"] = normal(kv_heads * head_dim, hidden, std=std)
        w[p + "self_attn.o_proj.weight"] = normal(hidden, heads * head_dim, std=std)
        if qwen:
            w[p + "self_attn.q_proj.bias"] = normal(heads * head_dim, std=0.1)
            w[p + "self_attn.k_proj.bias"] = normal(kv_heads * head_dim, std=0.1)
            w[p + "self_attn.v_proj.bias"] = normal(kv_heads * head_dim, std=0.1)
        w[p + "mlp.gate_proj.weight"] = normal(inter, hidden, std=std)
        w[p + "mlp.up_proj.weight"] = normal(inter, hidden, std=std)
        w[p + "mlp.down_proj.weight"] = normal(hidden, inter, std=inter**-0.5)
        w[p + "input_layernorm.weight"] = norm_weight()
        w[p + "post_attention_layernorm.weight"] = norm_weight()
    w["model.norm.weight"] = norm_weight()
    if not cfg["tie_word_embeddings"]:
        w["lm_head.weight"] = normal(cfg["vocab_size"], hidden, std=std)
    return {k: v.contiguous() for k, v in w.items()}


def _save_weights(weights: dict[str, torch.Tensor], out: Path, shards: int) -> None:
    if shards <= 1:
        save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    names = list(weights)
    per = -(-len(names) // shards)
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: weights[n] for n in names[s * per : (s + 1) * per]}
        save_file(part, str(out / fname), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, fname)
    total = sum(t.numel() * t.element_size() for t in weights.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def make_test_model(
    out_dir: str | Path,
    family: Family = "llama",
    seed: int = 0,
    shards: int = 1,
    **config_overrides: Any,
) -> Path:
    """Write a small random-weight checkpoint to `out_dir` and return its path."""
    if family not in _SPECIAL:
        raise ValueError(f"family must be one of {sorted(_SPECIAL)}, got {family!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    special = _SPECIAL[family]
    tok = train_tokenizer(family)
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    cfg = model_config(family, vocab_size, tok, **config_overrides)
    _save_weights(random_weights(cfg, seed), out, shards)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    tok.save(str(out / "tokenizer.json"))
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": special["bos"],
        "eos_token": special["eos"],
        "pad_token": special["eos"],
        "model_max_length": cfg["max_position_embeddings"],
        "chat_template": special["template"],
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    gen_cfg = {"eos_token_id": cfg["eos_token_id"]}
    if cfg.get("bos_token_id") is not None:
        gen_cfg["bos_token_id"] = cfg["bos_token_id"]
    (out / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2))
    return out


REALISTIC_SHAPES: dict[str, ModelConfig] = {
    # Qwen2-1.5B: tied embeddings, q/k/v biases, 6 query heads per KV head.
    "qwen2-1.5b": ModelConfig(
        family="qwen2",
        architecture="Qwen2ForCausalLM",
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        head_dim=128,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope=RopeConfig(theta=1000000.0),
        attention_bias=True,
        tie_word_embeddings=True,
    ),
    # Llama-3-8B: llama3 rope scaling as Llama-3.1 ships it.
    "llama3-8b": ModelConfig(
        family="llama",
        architecture="LlamaForCausalLM",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope=RopeConfig(
            theta=500000.0, rope_type="llama3", factor=8.0, original_max_position_embeddings=8192
        ),
    ),
}


@torch.no_grad()
def random_stage(
    config: ModelConfig,
    layer_range: LayerRange | None = None,
    device: torch.device | str = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
) -> DecoderStage:
    """A stage of `config` with random weights drawn on `device` in `dtype` (tied embeddings
    share one tensor), scaled as `random_weights` scales them."""
    with torch.device("meta"):
        stage = DecoderStage(config, layer_range).to(dtype)
    stage = stage.to_empty(device=device)
    stage.rotary = RotaryEmbedding(config.rope, config.head_dim, config.max_position_embeddings)
    stage.rotary.to(device)
    gen = torch.Generator(device).manual_seed(seed)
    hidden = config.hidden_size
    for name, param in stage.named_parameters():
        if name.endswith("norm.weight"):
            param.normal_(1.0, 0.1, generator=gen)
        elif name.endswith(".bias"):
            param.normal_(0.0, 0.1, generator=gen)
        elif name.startswith("embed_tokens."):
            param.normal_(0.0, 0.25 if config.tie_word_embeddings else 1.0, generator=gen)
        else:
            param.normal_(
                0.0, param.shape[1] ** -0.5 if param.dim() == 2 else hidden**-0.5, generator=gen
            )
    if config.tie_word_embeddings and stage.is_first and stage.is_last:
        stage.lm_head.weight = stage.embed_tokens.weight
    return stage.eval()
