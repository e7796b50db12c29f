"""Linear layers whose CPU matmuls can run through oneDNN on a weight packed once at load.

Why: at decode batch sizes F.linear on CPU (MKL sgemm on a plain weight) spends much of its
time re-laying-out the weight on every call, and the stage's linears alone ate most of a decode
step. oneDNN on a weight reordered once into its blocked layout is faster and steadier, and a
row's result does not depend on how many rows share the call (MKL's does for small batches), so
batched and one-at-a-time runs round alike. It rounds differently from MKL, not worse: against
a float64 reference it is as accurate as `transformers`' float32 (tests/engine/test_reference.py).

Decode steps (engine/cpu_decode.py) take a second packed copy in float32 where the native
kernels are built: panels for `cpu_kernels.panel_linear`, which has no per-call setup (oneDNN's
costs ~14 us a call, most of a decode-sized matmul; with AVX-512 the panels are 1.2x faster at
32 rows, 2.3x at one). With AVX2 only, oneDNN's kernels are faster than the panels at decode
sizes (1.2-1.6x at 8-32 rows), so decode there runs on the oneDNN copy, rows padded to a small
bucket (`decode_rows`), and no panels are packed. Each path is batch-invariant on its own:
decode always uses the same one, prefill always oneDNN.

oneDNN caches a compiled kernel per input shape (up to 1,024 per cache), so a prefill stage that
saw every micro-batch size from 1 to 2048 rows grew by ~0.4 GB of native memory before the
caches filled. Rows are padded up to a multiple of `ROW_BUCKET` (oneDNN is batch-invariant, so
the real rows' results do not change): 64 shapes at most per weight, ~0.14 GB, reached early.

The packed copies are kept beside the plain weight (which state dicts and tests still see), so
packing costs two more copies of the linear weights (one in a prefill-only PP stage, which never
decodes); `cpu_linear="mkl"` opts out of both.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from engine import cpu_kernels
from engine.engine_config import CpuLinear

log = logging.getLogger(__name__)

_PACKABLE = (torch.float32, torch.bfloat16)
ROW_BUCKET = 32
_warned: set[str] = set()


def _warn_once(key: str, message: str, *args: object) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message, *args)


def onednn_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether this torch build can run packed oneDNN linears in `dtype` on this CPU."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        torch.ops.mkldnn._linear_pointwise  # noqa: B018 (raises if the op is not built in)
        torch.ops.mkldnn._reorder_linear_weight  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return dtype != torch.bfloat16 or bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


class Linear(nn.Linear):
    """nn.Linear that uses its oneDNN-packed weight when `pack_linears` has given it one.

    Moving or casting the module drops the packed weight (it would be stale); so must anyone who
    writes the weight in place afterwards, by calling `pack_linears` again.
    """

    packed: torch.Tensor | None
    panels: torch.Tensor | None  # for decode steps: `cpu_kernels.panel_linear`

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.packed = None
        self.panels = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._packed_matmul(x, -x.reshape(-1, x.shape[-1]).shape[0] % ROW_BUCKET)

    def decode_forward(self, x: torch.Tensor) -> torch.Tensor:
        """A decode step's matmul where it has no panels: on oneDNN's packed weight, with the
        rows padded only to `decode_rows` (a batch of 3 padded to 32 rows would cost 32)."""
        return self._packed_matmul(x, decode_rows(x.shape[0]) - x.shape[0])

    def _packed_matmul(self, x: torch.Tensor, short: int) -> torch.Tensor:
        if self.packed is None:
            return F.linear(x, self.weight, self.bias)
        rows = x.reshape(-1, x.shape[-1])
        if short:
            rows = F.pad(rows, (0, 0, 0, short))
        out = _onednn_linear(rows, self.packed, self.bias)
        if short:
            out = out[: out.shape[0] - short]
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def _apply(self, fn, recurse: bool = True):
        self.packed = self.panels = None
        return super()._apply(fn, recurse)


def decode_rows(rows: int) -> int:
    """The rows a decode matmul of `rows` runs on oneDNN: the next power of two up to 8, then
    the next multiple of 8, so a decode batch of up to 64 compiles 11 kernel shapes per weight
    rather than 64, and pads at most 7 rows."""
    return 1 << (rows - 1).bit_length() if rows <= 8 else -(-rows // 8) * 8


def _onednn_linear(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@torch.no_grad()
def pack_linears(module: nn.Module, mode: CpuLinear = "onednn", decode: bool = True) -> int:
    """Packs every CPU float32/bf16 `Linear` in `module` for oneDNN ("onednn"), and, if it will
    `decode`, float32 ones into panels where the native kernels are built; or drops the packs
    ("mkl"). A prefill-only stage passes `decode=False` and holds no panels.
    Returns how many linears run packed for oneDNN; falls back to F.linear (logged once) where
    oneDNN cannot be used. Weights on other devices (CUDA) are left to F.linear."""
    if mode not in ("onednn", "mkl"):
        raise ValueError(f"unknown cpu_linear {mode!r} (onednn, mkl)")
    packed = 0
    for linear in module.modules():
        if not isinstance(linear, Linear):
            continue
        linear.packed = linear.panels = None
        weight = linear.weight
        if mode == "mkl" or weight.device.type != "cpu" or weight.dtype not in _PACKABLE:
            continue
        if decode and cpu_kernels.usable(weight) and cpu_kernels.panels_pay():
            linear.panels = cpu_kernels.pack_panels(weight)
        if not onednn_available(weight.dtype):
            _warn_once(
                f"unavailable-{weight.dtype}",
                "oneDNN linears unavailable for %s on this torch build/CPU; using F.linear",
                weight.dtype,
            )
            continue
        try:
            linear.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach())
        except RuntimeError as exc:
            _warn_once(
                f"failed-{weight.dtype}", "oneDNN weight packing failed (%s); using F.linear", exc
            )
            continue
        packed += 1
    return packed
