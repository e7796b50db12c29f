"""Linear layers whose CPU matmuls can run through oneDNN on a weight packed once at load.

Why: at decode batch sizes F.linear on CPU (MKL sgemm on a plain weight) spends much of its
time re-laying-out the weight on every call, and the stage's linears alone ate most of a decode
step. oneDNN on a weight reordered once into its blocked layout is faster and steadier, and a
row's result does not depend on how many rows share the call (MKL's does for small batches), so
batched and one-at-a-time runs round alike. It rounds differently from MKL, not worse: against
a float64 reference it is as accurate as `transformers`' float32 (tests/engine/test_reference.py).

Decode steps (engine/cpu_decode.py) read their own packed copy where the native kernels are
built: panels for `cpu_kernels.panel_linear` (float32 or bf16, the model's dtype), which has no
per-call setup (oneDNN's costs ~14 us a call, most of a decode-sized matmul; with AVX-512 the
panels are 1.2x faster at 32 rows, 2.3x at one). With AVX2 only, oneDNN's float32 kernels are
faster than the panels at decode sizes (1.2-1.6x at 8-32 rows), so float32 decode there runs on
the oneDNN copy, rows padded to a small bucket (`decode_rows`); bf16 decode runs on the panels
everywhere (oneDNN has no bf16 kernels without AVX512-BF16 or AMX, and F.linear in bf16 is
several times slower than float32 there). Each path is batch-invariant on its own: decode
always uses the same one, prefill always oneDNN where it packs the dtype.

oneDNN caches a compiled kernel per input shape (up to 1,024 per cache), so a prefill stage that
saw every micro-batch size from 1 to 2048 rows grew by ~0.4 GB of native memory before the
caches filled. Rows are padded up to a multiple of `ROW_BUCKET` (oneDNN is batch-invariant, so
the real rows' results do not change): 64 shapes at most per weight, ~0.14 GB, reached early.

One copy of each weight, in the form its reader takes (`pack_linears`): a prefill-only stage
keeps prefill's, a decode-only engine (a PD decode replica) decode's, a colocated one both (one
copy where both paths read the same); the plain weight is dropped once packed (a meta tensor of
its shape and dtype stays as `.weight`). A decode engine recomputing a preempted request
prefills on decode's copy. The LM head, which only ever sees the logit rows, keeps decode's copy
alone in every role; on the CPU its logits come out float32 (engine/cpu_decode.py), also in a
bf16 model, where rounding them to bf16 would tie near-equal candidates. `cpu_linear="mkl"`
keeps the plain weight and nothing else.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from engine import cpu_kernels
from engine.engine_config import CpuLinear, Role

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
    """nn.Linear that uses its oneDNN-packed weight, else its panels, when `pack_linears` has
    given it them; then its plain weight is gone (`weight` is a meta tensor).

    `logit_rows`: it only sees a few rows per call (the LM head on the logit rows), so it keeps
    decode's copy alone. Moving or casting a packed module is an error (its plain weight is gone); a
    module packed with its weight kept (`cpu_linear="mkl"`) may be moved.
    """

    packed: torch.Tensor | None
    panels: torch.Tensor | None  # for decode steps: `cpu_kernels.panel_linear`

    def __init__(self, *args, logit_rows: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.logit_rows = logit_rows
        self.packed = None
        self.panels = None

    @property
    def dropped(self) -> bool:
        """Whether the plain weight was dropped after packing."""
        return self.weight.is_meta and (self.packed is not None or self.panels is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._packed_matmul(x, -x.reshape(-1, x.shape[-1]).shape[0] % ROW_BUCKET)

    def decode_forward(self, x: torch.Tensor) -> torch.Tensor:
        """A decode step's matmul where it has no panels: on oneDNN's packed weight, with the
        rows padded only to `decode_rows` (a batch of 3 padded to 32 rows would cost 32)."""
        return self._packed_matmul(x, decode_rows(x.shape[0]) - x.shape[0])

    def _packed_matmul(self, x: torch.Tensor, short: int) -> torch.Tensor:
        if self.packed is None:
            if self.panels is None:
                return F.linear(x, self.weight, self.bias)
            rows = x.reshape(-1, x.shape[-1]).float()
            out = cpu_kernels.panel_linear(rows, self.panels, self.out_features, self.bias)
            return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        rows = x.reshape(-1, x.shape[-1])
        if short:
            rows = F.pad(rows, (0, 0, 0, short))
        out = _onednn_linear(rows, self.packed, self.bias)
        if short:
            out = out[: out.shape[0] - short]
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def _apply(self, fn, recurse: bool = True):
        if self.dropped:
            raise RuntimeError(
                "a packed Linear cannot be moved or cast: its plain weight was dropped at "
                "packing; load the model again instead"
            )
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
def pack_linears(module: nn.Module, mode: CpuLinear = "onednn", role: Role = "both") -> int:
    """Packs every CPU float32/bf16 `Linear` in `module` into the forms its `role` reads and
    drops the plain weight ("onednn"), or leaves the plain weight alone ("mkl").

    Prefill reads oneDNN's copy where this torch/CPU can pack the dtype, else the panels (where
    the native kernels are built), else the plain weight; decode reads the panels. A linear that
    keeps neither copy keeps its weight for F.linear (logged once); so do weights on other
    devices (CUDA). Linears packed before (plain weight dropped) keep their packs. Returns how
    many linears run packed for oneDNN."""
    if mode not in ("onednn", "mkl"):
        raise ValueError(f"unknown cpu_linear {mode!r} (onednn, mkl)")
    if role not in ("both", "prefill", "decode"):
        raise ValueError(f"unknown role {role!r} (both, prefill, decode)")
    packed = 0
    for linear in module.modules():
        if not isinstance(linear, Linear):
            continue
        if linear.dropped:
            if mode == "mkl":
                raise ValueError("cannot unpack a linear whose plain weight was dropped")
            packed += linear.packed is not None
            continue
        linear.packed = linear.panels = None
        weight = linear.weight
        if mode == "mkl" or weight.device.type != "cpu" or weight.dtype not in _PACKABLE:
            continue
        forms = _forms(linear, role, weight.dtype)
        if "packed" in forms:
            linear.packed = _onednn_pack(weight)
            if linear.packed is None and cpu_kernels.usable(weight):
                forms.add("panels")  # packing failed: the panels run what it would have
        if "panels" in forms:
            linear.panels = cpu_kernels.pack_panels(weight)
        if linear.packed is not None or linear.panels is not None:
            linear.weight = nn.Parameter(weight.to("meta"), requires_grad=False)
        packed += linear.packed is not None
    return packed


def _forms(linear: Linear, role: Role, dtype: torch.dtype) -> set[str]:
    """The packed copies (`packed`: oneDNN's, `panels`) that `linear` keeps in `role`: one per
    path it runs, prefill's (oneDNN, else the panels) and decode's (the panels where they pay or
    oneDNN cannot run the dtype, else oneDNN); the LM head runs decode's path in every role.
    Empty where neither can run: the plain weight then stays, for F.linear."""
    native = cpu_kernels.usable(torch.empty(0, dtype=dtype))
    onednn = onednn_available(dtype)
    if not onednn:
        _warn_once(
            f"unavailable-{dtype}",
            "oneDNN linears unavailable for %s on this torch build/CPU; prefill uses the "
            "native panels where built, else F.linear",
            dtype,
        )
    prefill_form = "packed" if onednn else "panels" if native else None
    panels_decode = native and (cpu_kernels.panels_pay() or not onednn)
    decode_form = "panels" if panels_decode else "packed" if onednn else None
    wanted = set()
    if role != "decode" and not linear.logit_rows:
        wanted.add(prefill_form)
    if role != "prefill" or linear.logit_rows:
        wanted.add(decode_form)
    return wanted - {None}


def _onednn_pack(weight: torch.Tensor) -> torch.Tensor | None:
    """oneDNN's packed copy of `weight`, or None where packing fails (logged once)."""
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach())
    except RuntimeError as exc:
        _warn_once(
            f"failed-{weight.dtype}", "oneDNN weight packing failed (%s); using F.linear", exc
        )
        return None
