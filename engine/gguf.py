"""GGUF checkpoints (llama.cpp's single-file format) of the Llama and Qwen2 families.

A `.gguf` file, or a directory holding exactly one and no `config.json`, is accepted wherever a
model directory is: `ModelConfig.from_dir`, `Tokenizer.from_dir` and `load_stage` dispatch here.
The config comes from the file's `<arch>.*` metadata, the tokenizer from `tokenizer.ggml.*`
(rebuilt the way transformers' GGUF converter builds it, so ids are identical), and weights
are dequantized to the serving dtype at load, reading only the tensors a stage owns.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # the ingress reads the tokenizer from a GGUF without loading torch
    import torch

from engine.config import SUPPORTED_ROPE_TYPES, ModelConfig, RopeConfig
from engine.errors import GGUFFormatError, ModelLoadError, UnsupportedGGUFError

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
# GGUF architecture -> (our family, the HF architecture it corresponds to).
SUPPORTED_GGUF_ARCHITECTURES = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
}
# Tensor types we dequantize (all through `gguf.quants`, the code transformers uses too).
SUPPORTED_TENSOR_TYPES = (
    "F32",
    "F16",
    "BF16",
    "Q4_0",
    "Q4_1",
    "Q5_0",
    "Q5_1",
    "Q8_0",
    "Q2_K",
    "Q3_K",
    "Q4_K",
    "Q5_K",
    "Q6_K",
)
_SPLIT_FILE = re.compile(r"-\d{5}-of-\d{5}\.gguf$")


def find_gguf(path: str | Path) -> Path | None:
    """The GGUF file `path` stands for, or None when it is not a GGUF model.

    A file counts when named `*.gguf` or starting with the GGUF magic; a directory when it has
    no `config.json` (a Hugging Face directory wins) and exactly one `*.gguf` file.
    """
    p = Path(path)
    if p.is_file():
        if p.suffix.lower() == ".gguf":
            return p
        with p.open("rb") as f:
            return p if f.read(4) == GGUF_MAGIC else None
    if not p.is_dir() or (p / "config.json").is_file():
        return None
    files = sorted(f for f in p.iterdir() if f.suffix.lower() == ".gguf" and f.is_file())
    if len(files) > 1:
        names = ", ".join(f.name for f in files)
        hint = (
            "split GGUF files are not supported; merge them with `llama-gguf-split --merge`"
            if any(_SPLIT_FILE.search(f.name) for f in files)
            else "pass the path of the one to serve"
        )
        raise ModelLoadError(f"{p} holds {len(files)} .gguf files ({names}); {hint}")
    return files[0] if files else None


@lru_cache(maxsize=4)
def _read(path: str, mtime_ns: int, size: int) -> Any:
    """Parses a GGUF header once per file version; tensor data stays memory-mapped, unread."""
    from gguf import GGUFReader

    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise GGUFFormatError(
            f"{path} is not a GGUF file (starts with {magic!r}, not {GGUF_MAGIC!r})"
        )
    try:
        reader = GGUFReader(path)
    except Exception as exc:
        raise GGUFFormatError(
            f"{path} ({size} bytes) is truncated or corrupt; cannot parse its GGUF header "
            f"and tensor table: {exc}"
        ) from exc
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise GGUFFormatError(
                f"{path} is truncated: tensor {t.name} ends at byte {t.data_offset + t.n_bytes}, "
                f"the file has {size}"
            )
    return reader


def open_gguf(path: str | Path) -> Any:
    """A `gguf.GGUFReader` for `path`, shared by config, tokenizer and stage loading."""
    p = Path(path).resolve()
    try:
        st = p.stat()
    except OSError as exc:
        raise ModelLoadError(f"cannot open GGUF file {p}: {exc}") from exc
    return _read(str(p), st.st_mtime_ns, st.st_size)


class _Metadata:
    """Typed access to a reader's key/value fields, with errors naming the file and key."""

    def __init__(self, reader: Any, path: str | Path) -> None:
        self._fields = reader.fields
        self.path = path

    def __contains__(self, key: str) -> bool:
        return key in self._fields

    def get(self, key: str, default: Any = None) -> Any:
        field = self._fields.get(key)
        if field is None:
            return default
        try:
            return field.contents()
        except Exception as exc:
            raise GGUFFormatError(f"{self.path}: metadata {key} is corrupt: {exc}") from exc

    def require(self, key: str) -> Any:
        if key not in self._fields:
            raise GGUFFormatError(f"{self.path} lacks required GGUF metadata {key}")
        return self.get(key)

    def positive_int(self, key: str, default: int | None = None) -> int:
        value = self.require(key) if default is None else self.get(key, default)
        if isinstance(value, list):  # per-layer values: we need them uniform
            if len(set(value)) != 1:
                raise UnsupportedGGUFError(f"{self.path}: per-layer {key}={value} is not supported")
            value = value[0]
        if int(value) <= 0:
            raise GGUFFormatError(f"{self.path}: metadata {key} must be positive, got {value}")
        return int(value)


def _architecture(meta: _Metadata) -> str:
    arch = meta.require("general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise UnsupportedGGUFError(
            f"{meta.path}: GGUF architecture {arch!r} is not supported; pdserve runs "
            f"{', '.join(sorted(SUPPORTED_GGUF_ARCHITECTURES))}"
        )
    return str(arch)


def _rope(meta: _Metadata, arch: str) -> RopeConfig:
    """Rope parameters from `<arch>.rope.*` (llama.cpp's names for HF's `rope_scaling`)."""
    theta = float(meta.get(f"{arch}.rope.freq_base", 10000.0))
    kind = meta.get(f"{arch}.rope.scaling.type")
    factor = meta.get(f"{arch}.rope.scaling.factor")
    if kind is None and meta.get(f"{arch}.rope.scale_linear") is not None:  # older files
        kind, factor = "linear", meta.get(f"{arch}.rope.scale_linear")
    if kind in (None, "none") or (factor in (None, 0.0, 1.0) and kind != "yarn"):
        return RopeConfig(theta=theta)
    if kind not in ("linear", "yarn"):
        raise UnsupportedGGUFError(
            f"{meta.path}: rope scaling {kind!r} is not supported "
            f"(supported: none, linear, yarn; pdserve's rope types: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    original = meta.get(f"{arch}.rope.scaling.original_context_length")
    extra: dict[str, Any] = {}
    if original is not None:
        extra["original_max_position_embeddings"] = int(original)
    for key, ours in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
        if (value := meta.get(f"{arch}.rope.scaling.{key}")) is not None:
            extra[ours] = float(value)
    return RopeConfig(theta=theta, rope_type=kind, factor=float(factor or 1.0), **extra)


def _eos_ids(meta: _Metadata) -> tuple[int, ...]:
    """End-of-generation ids: eos plus llama.cpp's end-of-turn/end-of-message, as it stops on all."""
    keys = ("eos_token_id", "eot_token_id", "eom_token_id")
    ids = [meta.get(f"tokenizer.ggml.{k}") for k in keys]
    return tuple(dict.fromkeys(int(i) for i in ids if i is not None))


def config_from_gguf(path: str | Path) -> ModelConfig:
    """Our ModelConfig from the file's metadata (what transformers' GGUF config mapping reads)."""
    reader = open_gguf(path)
    meta = _Metadata(reader, path)
    arch = _architecture(meta)
    family, hf_arch = SUPPORTED_GGUF_ARCHITECTURES[arch]
    tensors = {t.name: t for t in reader.tensors}
    embd = tensors.get("token_embd.weight")
    if embd is None:
        raise GGUFFormatError(f"{path} has no token_embd.weight tensor")
    hidden = meta.positive_int(f"{arch}.embedding_length")
    heads = meta.positive_int(f"{arch}.attention.head_count")
    kv_heads = meta.positive_int(f"{arch}.attention.head_count_kv", heads)
    if heads % kv_heads:
        raise GGUFFormatError(
            f"{path}: head_count={heads} is not a multiple of head_count_kv={kv_heads}"
        )
    head_dim = meta.get(f"{arch}.attention.key_length")
    if head_dim is None and arch == "llama":
        head_dim = meta.get(f"{arch}.rope.dimension_count")
    vocab = int(meta.get(f"{arch}.vocab_size") or embd.shape[1])
    file_type = meta.get("general.file_type")
    return ModelConfig(
        family=family,
        architecture=hf_arch,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=meta.positive_int(f"{arch}.feed_forward_length"),
        num_hidden_layers=meta.positive_int(f"{arch}.block_count"),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=int(head_dim or hidden // heads),
        max_position_embeddings=meta.positive_int(f"{arch}.context_length", 2048),
        rms_norm_eps=float(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope=_rope(meta, arch),
        attention_bias=family == "qwen2" or "blk.0.attn_q.bias" in tensors,
        # llama.cpp drops output.weight when the LM head is the embedding.
        tie_word_embeddings="output.weight" not in tensors,
        torch_dtype={1: "float16", 32: "bfloat16"}.get(file_type, "float32"),
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=_eos_ids(meta),
    )


# Hugging Face tensor name (as engine.loader asks for it) -> GGUF tensor name.
_LAYER_TENSORS = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
_GLOBAL_TENSORS = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def gguf_name(hf_name: str) -> str | None:
    """The GGUF tensor name llama.cpp's converter writes for HF tensor `hf_name`."""
    if hf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[hf_name]
    m = _LAYER_NAME.match(hf_name)
    if m and m.group(2) in _LAYER_TENSORS:
        return f"blk.{m.group(1)}.{_LAYER_TENSORS[m.group(2)]}.{m.group(3)}"
    return None


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undoes llama.cpp's q/k row permutation (interleaved rope -> HF's rotate-half layout)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def dequantize(tensor: Any) -> torch.Tensor:
    """A GGUF tensor as float32 in torch's [out, in] layout; unsupported types fail by name."""
    from gguf import quants

    kind = tensor.tensor_type.name
    if kind not in SUPPORTED_TENSOR_TYPES:
        raise UnsupportedGGUFError(
            f"tensor {tensor.name} has type {kind}, which pdserve cannot dequantize "
            f"(supported: {', '.join(SUPPORTED_TENSOR_TYPES)})"
        )
    shape = tuple(int(d) for d in reversed(tensor.shape))
    values = np.asarray(quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
    # A copy: the data is a read-only view of the memory-mapped file.
    import torch

    return torch.from_numpy(values.reshape(shape).copy())


@dataclass
class GGUFCheckpoint:
    """The tensors of one GGUF file, under the HF names engine.loader asks for."""

    path: Path
    config: ModelConfig

    def __post_init__(self) -> None:
        reader = open_gguf(self.path)
        self._arch = _architecture(_Metadata(reader, self.path))
        self._tensors = {t.name: t for t in reader.tensors}

    def __contains__(self, hf_name: object) -> bool:
        return isinstance(hf_name, str) and gguf_name(hf_name) in self._tensors

    def check(self, hf_names: Iterable[str]) -> None:
        """Fails before anything is dequantized when a wanted tensor has an unsupported type."""
        for n in hf_names:
            t = self._tensors[gguf_name(n)]  # type: ignore[index]
            if t.tensor_type.name not in SUPPORTED_TENSOR_TYPES:
                raise UnsupportedGGUFError(
                    f"{self.path}: tensor {t.name} has type {t.tensor_type.name}, which pdserve "
                    f"cannot dequantize (supported: {', '.join(SUPPORTED_TENSOR_TYPES)})"
                )

    def read(self, hf_name: str) -> torch.Tensor:
        name = gguf_name(hf_name)
        assert name is not None
        value = dequantize(self._tensors[name])
        if self._arch == "llama" and ".attn_q." in name:
            value = _unpermute(value, self.config.num_attention_heads)
        elif self._arch == "llama" and ".attn_k." in name:
            value = _unpermute(value, self.config.num_key_value_heads)
        return value

    def rope_freq_factors(self) -> torch.Tensor | None:
        """llama.cpp stores Llama 3.1-style rope scaling as per-frequency divisors."""
        t = self._tensors.get("rope_freqs.weight")
        return None if t is None else dequantize(t)


# ---- tokenizer ---------------------------------------------------------------------------

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# `tokenizer.ggml.pre` -> split regex, as transformers' GGUF converter maps them; any other
# value keeps GPT-2's byte-level regex (e.g. "smollm", "gpt2", "default").
_PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(
        (
            "llama3",
            "llama-v3",
            "llama-bpe",
            "falcon3",
            "falcon-h1",
            "pixtral",
            "midm-2.0",
            "lfm2",
            "jina-v5-nano",
            "dbrx",
            "smaug-bpe",
        ),
        _LLAMA3_SPLIT,
    ),
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2_SPLIT),
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O_SPLIT),
}
_CONTROL, _USER_DEFINED = 3, 4


@dataclass(frozen=True)
class GGUFTokenizerParts:
    backend: Any  # tokenizers.Tokenizer
    chat_template: str | None
    bos_token: str | None
    eos_token: str | None
    eos_token_ids: tuple[int, ...]


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table (transformers' `bytes_to_unicode`)."""
    # Printable latin-1 bytes map to themselves, the rest to U+0100 onwards, in byte order.
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def tokenizer_from_gguf(path: str | Path) -> GGUFTokenizerParts:
    """A `tokenizers` byte-level BPE built from `tokenizer.ggml.*`.

    Mirrors transformers' GGUF converter (GPT2Tokenizer + control/user-defined tokens + the
    split regex of `tokenizer.ggml.pre`), so token ids match `AutoTokenizer(gguf_file=...)`.
    """
    from tokenizers import AddedToken, Regex, decoders, pre_tokenizers, processors
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import BPE

    reader = open_gguf(path)
    meta = _Metadata(reader, path)
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise UnsupportedGGUFError(
            f"{path}: GGUF tokenizer model {kind!r} is not supported; pdserve builds byte-level "
            "BPE ('gpt2': Llama 3, Qwen2, SmolLM) tokenizers only"
        )
    tokens: list[str] = meta.require("tokenizer.ggml.tokens")
    merges: list[str] = meta.get("tokenizer.ggml.merges") or []
    types: list[int] = meta.get("tokenizer.ggml.token_type") or []
    spelling = _byte_alphabet()
    alphabet = set(spelling.values())
    vocab = {
        t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
        for i, t in enumerate(tokens)
    }
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    if any(len(p) != 2 for p in pairs):
        raise GGUFFormatError(f"{path}: tokenizer.ggml.merges holds a malformed merge")
    backend = HFTokenizer(BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    split = _PRE_TOKENIZER_SPLITS.get(meta.get("tokenizer.ggml.pre"))
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    backend.decoder = decoders.ByteLevel()

    def token(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    # Control tokens are special; one spelled outside the byte alphabet is a llama.cpp mislabel
    # (and would grow the vocabulary), so it is skipped, as transformers does.
    roles = {
        token(k) for k in ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id")
    }
    special = [
        t for t, k in zip(tokens, types, strict=False) if k == _CONTROL and set(t) <= alphabet
    ]
    special += [t for t in roles if t is not None and t not in special and set(t) <= alphabet]
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in special])
    user = [t for t, k in zip(tokens, types, strict=False) if k == _USER_DEFINED and t in vocab]
    backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])

    bos, eos = token("bos_token_id"), token("eos_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    single = ([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else [])
    pair = single + ([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else [])
    ends = {t: vocab[t] for t in (bos if add_bos else None, eos if add_eos else None) if t}
    backend.post_processor = processors.TemplateProcessing(
        single=" ".join(single), pair=" ".join(pair), special_tokens=list(ends.items())
    )
    return GGUFTokenizerParts(
        backend=backend,
        chat_template=meta.get("tokenizer.chat_template"),
        bos_token=bos,
        eos_token=eos,
        eos_token_ids=_eos_ids(meta),
    )
