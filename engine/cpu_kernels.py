"""The engine's native CPU kernels (engine/csrc/cpu_decode.c), built on first use, called
through ctypes.

Why native: a decode step's norms, activation, rotary, KV write and attention are microseconds
of arithmetic but cost tens of microseconds each as torch ops on the CPU, more than the layer's
matmuls. The library is compiled once per machine kind (gcc, `-march=native`) into
`$PDSERVE_CACHE/kernels/`, keyed by the source, the flags, the compiler and the CPU, so nodes of
a cluster sharing a home directory never load a build for another CPU. It links the OpenMP
runtime torch has already loaded (`libgomp.so.1`), so both share one thread pool.

Without a compiler the engine still runs, on the slower torch ops, and says so once in the log;
`require()` is what tests and `make test` use to fail loudly instead.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from engine.paths import cache_dir

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "cpu_decode.c"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-shared", "-fPIC", "-std=gnu11")

_P, _I64, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
_SIGNATURES = {
    "pd_add_rms_norm": (_P, _P, _P, _P, _P, _I64, _I64, _F32),
    "pd_silu_mul": (_P, _P, _I64, _I64),
    "pd_rotary_cos_sin": (_P, ctypes.c_int32, _I64, _P, _I64, _F32, _P, _P),
    "pd_decode_attention": (_P, _I64, _P, _P, _P, _P, _P, _P, _I64) + (_I64,) * 5 + (_F32, _P),
    "pd_pack_panels": (_P, _I64, _I64, _P),
    "pd_panel_linear": (_P, _P, _P, _P, _I64, _I64, _I64),
    "pd_panel_width": (),
}


class NativeKernelsUnavailable(RuntimeError):
    """The CPU kernels could not be built or loaded (the message says why)."""


def _compiler() -> str:
    for name in (os.environ.get("CC"), "cc", "gcc"):
        if name and (path := shutil.which(name)):
            return path
    raise NativeKernelsUnavailable("no C compiler (cc or gcc) on PATH; install gcc")


def _cpu_signature() -> str:
    """What `-march=native` depends on: the CPU's model and feature flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    lines = [line for line in info.splitlines() if line.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(lines)))


def _build(compiler: str) -> Path:
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, check=False
    ).stdout
    key = hashlib.sha256(
        "\0".join([SOURCE.read_text(), " ".join(FLAGS), version, _cpu_signature()]).encode()
    ).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"cpu_decode-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: processes starting together never load half a file.
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so")
    os.close(fd)
    try:
        result = subprocess.run(
            [compiler, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True
        )
        if result.returncode != 0:
            raise NativeKernelsUnavailable(f"{compiler} failed on {SOURCE}:\n{result.stderr}")
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
    log.info("built the CPU kernels into %s", target)
    return target


@functools.cache
def _library() -> ctypes.CDLL | NativeKernelsUnavailable:
    if os.environ.get("PDSERVE_NATIVE_CPU", "1") == "0":
        return NativeKernelsUnavailable("disabled by PDSERVE_NATIVE_CPU=0")
    try:
        lib = ctypes.CDLL(str(_build(_compiler())))
    except (NativeKernelsUnavailable, OSError) as exc:
        if not isinstance(exc, NativeKernelsUnavailable):
            exc = NativeKernelsUnavailable(f"cannot load the CPU kernels: {exc}")
        log.warning("CPU kernels unavailable, using torch ops (slower): %s", exc)
        return exc
    for name, argtypes in _SIGNATURES.items():
        getattr(lib, name).argtypes = argtypes
        getattr(lib, name).restype = None
    lib.pd_panel_width.restype = ctypes.c_int32
    return lib


def available() -> bool:
    return not isinstance(_library(), Exception)


def require() -> ctypes.CDLL:
    """The library, or the reason it is missing as an exception."""
    lib = _library()
    if isinstance(lib, Exception):
        raise lib
    return lib


_torch_ops_only = False


@contextlib.contextmanager
def torch_ops_only() -> Iterator[None]:
    """Within this block the engine runs its CPU torch ops instead (tests compare the two)."""
    global _torch_ops_only
    before, _torch_ops_only = _torch_ops_only, True
    try:
        yield
    finally:
        _torch_ops_only = before


def usable(x: torch.Tensor) -> bool:
    """Whether the kernels take this tensor: float32 on the CPU, with the library built."""
    return (
        x.dtype == torch.float32 and x.device.type == "cpu" and not _torch_ops_only and available()
    )


@functools.cache
def panels_pay() -> bool:
    """Whether decode matmuls should run on the panels rather than oneDNN: where the CPU has
    AVX-512 (measured 1.2x oneDNN at 32 rows, 2.3x at one). With AVX2 only, oneDNN's kernels
    beat the panels at decode sizes (1.2-1.6x at 8-32 rows on an AMD EPYC)."""
    return torch.backends.cpu.get_cpu_capability() not in ("DEFAULT", "AVX2")


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + residual), x + residual); without a residual, (norm(x), x). As RMSNorm."""
    x = x.contiguous()
    n = x.shape[-1]
    out = torch.empty_like(x)
    total = x
    res_ptr = None
    if residual is not None:
        residual = residual.contiguous()
        total = torch.empty_like(x)
        res_ptr = residual.data_ptr()
    require().pd_add_rms_norm(
        x.data_ptr(),
        res_ptr,
        weight.data_ptr(),
        total.data_ptr(),
        out.data_ptr(),
        x.numel() // n,
        n,
        eps,
    )
    return out, total


def pack_panels(weight: torch.Tensor) -> torch.Tensor:
    """A linear's weight `[n, k]` packed for `panel_linear`: `[ceil(n / width), k, width]`, the
    width (output columns per panel) the kernel was built with."""
    weight = weight.detach().contiguous()
    n, k = weight.shape
    width = require().pd_panel_width()
    packed = weight.new_empty((-(-n // width), k, width))
    require().pd_pack_panels(weight.data_ptr(), n, k, packed.data_ptr())
    return packed


def panel_linear(
    x: torch.Tensor, packed: torch.Tensor, n: int, bias: torch.Tensor | None
) -> torch.Tensor:
    """`F.linear` at decode batch sizes on a weight packed by `pack_panels` (`n` outputs): each
    output one multiply-add chain over k in order, so a row's result does not depend on how many
    rows share the call. Unchecked (the layers' own tensors): float32, bias contiguous."""
    x = x.contiguous()
    rows, k = x.shape
    out = x.new_empty((rows, n))
    require().pd_panel_linear(
        x.data_ptr(),
        packed.data_ptr(),
        None if bias is None else bias.data_ptr(),
        out.data_ptr(),
        rows,
        k,
        n,
    )
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of a `[rows, 2 * inter]` gate-up matmul output."""
    gate_up = gate_up.contiguous()
    inter = gate_up.shape[-1] // 2
    out = gate_up.new_empty((*gate_up.shape[:-1], inter))
    require().pd_silu_mul(gate_up.data_ptr(), out.data_ptr(), out.numel() // inter, inter)
    return out


def rotary_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin `[T, 1, 2 * len(inv_freq)]` as `RotaryEmbedding.cos_sin` makes them,
    from int32 or int64 positions."""
    rows, half = positions.shape[0], inv_freq.shape[0]
    cos = torch.empty((rows, 1, 2 * half))
    sin = torch.empty((rows, 1, 2 * half))
    require().pd_rotary_cos_sin(
        positions.data_ptr(),
        positions.dtype == torch.int32,
        rows,
        inv_freq.data_ptr(),
        half,
        scaling,
        cos.data_ptr(),
        sin.data_ptr(),
    )
    return cos, sin


def decode_attention(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    positions: torch.Tensor,
    block_tables: torch.Tensor,
    page_size: int,
    num_heads: int,
) -> torch.Tensor:
    """A decode step's attention from the q/k/v projection output `[B, (H + 2 Hkv) D]`:
    rotary at `positions`, the new K/V written to its slot, attention over the pages of
    `block_tables` (int32 `[B, >= pages]`) read in place. Returns `[B, H, D]`.

    Unchecked (the layer's own tensors, once per layer per step): float32; qkv rows, cos, sin
    `[B, D]` and the caches contiguous; positions and tables int32."""
    batch = qkv.shape[0]
    _, kv_heads, dim = k_cache.shape
    out = qkv.new_empty((batch, num_heads, dim))
    require().pd_decode_attention(
        qkv.data_ptr(),
        qkv.stride(0),
        cos.data_ptr(),
        sin.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        positions.data_ptr(),
        block_tables.data_ptr(),
        block_tables.stride(0),
        batch,
        num_heads,
        kv_heads,
        dim,
        page_size,
        dim**-0.5,
        out.data_ptr(),
    )
    return out
