"""Runs one stage's forward over its paged KV cache: the piece a PP stage actor and the
whole-model engine share. On CUDA, decode steps and short fresh-prompt prefill steps replay
CUDA graphs (engine/cuda_graphs.py); on the CPU, float32 and bf16 decode steps read pages in place
with the native kernels (engine/cpu_kernels.py)."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from engine import cpu_kernels
from engine.attention import AttentionMetadata, SeqChunk, is_decode_step
from engine.kv_cache import KVCacheSpec, PagedKVCache
from engine.linear import onednn_available
from engine.model import DecoderStage

log = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _cpu_flags() -> set[str] | None:
    """The CPU's feature flags (Linux), or None where /proc/cpuinfo cannot tell."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    line = next((line for line in info.splitlines() if line.startswith("flags")), None)
    return None if line is None else set(line.partition(":")[2].split())


@functools.cache
def cpu_bf16_choice() -> tuple[bool, str]:
    """Whether `dtype="auto"` runs bfloat16 on this CPU, and why; logged once.

    bf16 pays on the CPU where it has bf16 arithmetic (AVX512-BF16 dot products, AMX tiles):
    oneDNN's prefill matmuls then run in bf16 and the native decode matmul multiplies bf16 pairs.
    Elsewhere (AVX2, plain AVX-512) bf16 matmuls are emulated, several times slower than float32
    in prefill (F.linear at 1,024 rows: 8x on an AVX2 EPYC), so float32 stays the default."""
    flags = _cpu_flags()
    has = [] if flags is None else sorted(flags & {"avx512_bf16", "amx_bf16"})
    onednn = onednn_available(torch.bfloat16)  # torch's `_is_mkldnn_bf16_supported()`
    if flags is not None and not has:
        choice = False, "the CPU has neither avx512_bf16 nor amx_bf16"
    elif not onednn:
        choice = False, "torch's oneDNN has no bf16 kernels for this CPU"
    else:
        found = ", ".join(has) if has else "oneDNN bf16 (CPU flags unreadable)"
        choice = True, f"the CPU has {found}"
    log.info("dtype auto on the CPU: %s (%s)", "bfloat16" if choice[0] else "float32", choice[1])
    return choice


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The engine's dtype: `auto` is bfloat16 on GPUs and on CPUs with native bf16 arithmetic
    (`cpu_bf16_choice`), float32 on other CPUs; an explicit dtype is taken as given."""
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16
        return torch.bfloat16 if cpu_bf16_choice()[0] else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
            dtype
        ]
    except KeyError:
        raise ValueError(
            f"unsupported dtype {dtype!r} (auto, float32, bfloat16, float16)"
        ) from None


def page_bytes(spec: KVCacheSpec, num_layers: int) -> int:
    """Bytes one page costs across K and V of `num_layers` layers."""
    elem = torch.empty((), dtype=spec.dtype).element_size()
    return 2 * spec.page_size * spec.num_kv_heads * spec.head_dim * elem * num_layers


def freeze_loaded_objects() -> None:
    """Move what a serving process has loaded (modules, parameters, tokenizer), which lives as
    long as the process, out of the garbage collector's sight, so the collections that each
    step's objects trigger stop rescanning it (~7% of a CPU decode step's samples); vLLM does the
    same after loading. Once per process, when loading is done: it collects first, and hands
    the memory loading freed back to the OS (glibc keeps freed heap memory otherwise: checkpoint
    buffers and the plain weights dropped after packing, 60-190 MiB of SmolLM2's resident size)."""
    gc.collect()
    gc.freeze()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL(None).malloc_trim(0)


class StageRunner:
    def __init__(
        self,
        stage: DecoderStage,
        kv_cache: PagedKVCache,
        max_decode_batch: int = 128,
        cuda_graphs: bool = True,
    ) -> None:
        """`max_decode_batch`: the largest decode batch replayed from a CUDA graph (larger ones
        run eagerly); `cuda_graphs=False` runs every CUDA step eagerly."""
        if kv_cache.num_layers != len(stage.layers):
            raise ValueError(
                f"KV cache holds {kv_cache.num_layers} layers, the stage {len(stage.layers)}"
            )
        self.stage = stage
        self.kv_cache = kv_cache
        self.device = stage.rotary.inv_freq.device  # parameters may be packed (meta)
        self.cuda_graphs = None
        # Decode reads pages in place on CUDA, and on the CPU when the native kernels take the
        # cache's dtype; otherwise each layer gathers the batch's pages with torch ops.
        self.paged_decode = self.device.type == "cuda" or cpu_kernels.usable(kv_cache.layers[0])
        if self.device.type == "cuda":
            from engine.cuda_graphs import CudaGraphRunner

            self.cuda_graphs = CudaGraphRunner(stage, kv_cache, max_decode_batch, cuda_graphs)

    @property
    def page_size(self) -> int:
        return self.kv_cache.spec.page_size

    def forward(
        self, chunks: Sequence[SeqChunk], inputs: torch.Tensor, all_logits: bool = False
    ) -> torch.Tensor:
        """Token ids [T] (first stage) or hidden states [T, H] in; hidden states or logits out.

        On CUDA the result of a step replayed from a graph is a view of the graphs' output
        buffer, valid until the next step: consume it (sample, copy) first."""
        if self.cuda_graphs is not None:
            if is_decode_step(chunks):
                return self.cuda_graphs.decode(chunks, inputs)
            graphable = not all_logits and not any(c.all_logits for c in chunks)
            if graphable and (out := self.cuda_graphs.prefill(chunks, inputs)) is not None:
                return out
        meta = AttentionMetadata.build(
            chunks, self.page_size, self.device, all_logits, paged_decode=self.paged_decode
        )
        if inputs.shape[0] != meta.num_tokens:
            raise ValueError(f"{inputs.shape[0]} input rows for a step of {meta.num_tokens} tokens")
        return self.stage(inputs.to(self.device, non_blocking=True), meta, self.kv_cache)
