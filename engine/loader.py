"""Loading a stage's weights from a local Hugging Face checkpoint (safetensors, sharded or not)
or a GGUF file (engine/gguf.py dequantizes its tensors).

Only the tensors the stage owns are read: its layers, plus the embedding (first stage) or the
final norm and LM head (last stage). q/k/v and gate/up projections are fused at load.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open

from engine.config import ModelConfig
from engine.errors import ModelLoadError
from engine.gguf import GGUFCheckpoint, find_gguf
from engine.layer_range import LayerRange
from engine.linear import CpuLinear, Role, pack_linears
from engine.model import DecoderStage

log = logging.getLogger(__name__)

_FUSED = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}


def checkpoint_index(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file that holds it."""
    index_file = model_dir / "model.safetensors.index.json"
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise ModelLoadError(f"{index_file} is not a valid safetensors index: {exc}") from exc
        missing = sorted({f for f in weight_map.values() if not (model_dir / f).is_file()})
        if missing:
            raise ModelLoadError(
                f"{model_dir} lacks shard(s) named in its index: {', '.join(missing)}"
            )
        return {name: model_dir / f for name, f in weight_map.items()}
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(
            f"{model_dir} holds no *.safetensors weights (pytorch .bin checkpoints are not supported)"
        )
    index: dict[str, Path] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as handle:
                index.update(dict.fromkeys(handle.keys(), f))
        except Exception as exc:
            raise ModelLoadError(f"cannot read {f}: {exc}") from exc
    return index


def _hf_name(param: str, layer_range: LayerRange) -> list[str]:
    """HF tensor names that make up our parameter `param`, in fusion order."""
    if param.startswith("layers."):
        _, local, rest = param.split(".", 2)
        prefix = f"model.layers.{layer_range.start + int(local)}."
        for fused, parts in _FUSED.items():
            if rest.startswith(fused + "."):
                suffix = rest[len(fused) :]
                return [prefix + p + suffix for p in parts]
        return [prefix + rest]
    if param.startswith(("embed_tokens.", "norm.")):
        return ["model." + param]
    return [param]


def load_stage(
    model_dir: str | Path,
    layer_range: LayerRange | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    config: ModelConfig | None = None,
    cpu_linear: CpuLinear = "onednn",
    decode: bool = True,
    role: Role = "both",
) -> DecoderStage:
    """Loads layers `layer_range` (default: all) of the checkpoint in `model_dir`.

    `cpu_linear` picks how CPU linears run (engine/linear.py): their weights are packed here,
    once, after every weight is in place, into the forms the stage's `role` reads, and the
    plain weights dropped. `decode=False` is `role="prefill"` (a PP stage of a prefill
    instance, which never decodes).
    """
    model_dir = Path(model_dir)
    config = config or ModelConfig.from_dir(model_dir)
    gguf_file = find_gguf(model_dir)
    checkpoint = GGUFCheckpoint(gguf_file, config) if gguf_file else None
    index = checkpoint if checkpoint is not None else checkpoint_index(model_dir)
    with torch.device("meta"):
        stage = DecoderStage(config, layer_range)
    stage = stage.to_empty(device=device)
    stage.rotary = type(stage.rotary)(config.rope, config.head_dim, config.max_position_embeddings)
    stage.rotary.to(device)

    wanted: dict[str, list[str]] = {}
    for param in stage.state_dict():
        if param.startswith("rotary."):
            continue
        names = _hf_name(param, stage.layer_range)
        if param == "lm_head.weight" and (
            config.tie_word_embeddings or "lm_head.weight" not in index
        ):
            names = ["model.embed_tokens.weight"]
        wanted[param] = names
    missing = sorted({n for names in wanted.values() for n in names if n not in index})
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ModelLoadError(f"{model_dir}: checkpoint lacks {len(missing)} tensor(s): {shown}")

    if checkpoint is not None:
        # GGUF tensors are dequantized one parameter at a time, keeping the float32 peak small.
        checkpoint.check(n for names in wanted.values() for n in names)
        read = checkpoint.read
    else:
        by_file: dict[Path, set[str]] = defaultdict(set)
        for names in wanted.values():
            for n in names:
                by_file[index[n]].add(n)
        tensors: dict[str, torch.Tensor] = {}
        for f, names in by_file.items():
            with safe_open(str(f), framework="pt") as handle:
                for n in names:
                    tensors[n] = handle.get_tensor(n)
        read = tensors.__getitem__

    state = stage.state_dict()
    with torch.no_grad():
        for param, names in wanted.items():
            value = torch.cat([read(n) for n in names], dim=0) if len(names) > 1 else read(names[0])
            target = state[param]
            if tuple(value.shape) != tuple(target.shape):
                raise ModelLoadError(
                    f"{model_dir}: tensor {'+'.join(names)} has shape {tuple(value.shape)}, "
                    f"the model config implies {tuple(target.shape)}"
                )
            target.copy_(value.to(dtype))
    stage.to(dtype)
    stage.rotary.inv_freq = stage.rotary.inv_freq.float()
    if checkpoint is not None and (factors := checkpoint.rope_freq_factors()) is not None:
        stage.rotary.inv_freq = (stage.rotary.inv_freq / factors.to(device)).float()
    packed = pack_linears(stage, cpu_linear, role if decode else "prefill")
    log.info(
        "loaded stage",
        extra={
            "layers": f"[{stage.layer_range.start},{stage.layer_range.end})",
            "model": str(model_dir),
            "packed_linears": packed,
        },
    )
    return stage.eval()
