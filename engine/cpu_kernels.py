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

They take float32 and bfloat16 models. In bfloat16 the weights and the KV cache stay bf16 (half
the bytes a decode step reads) and the arithmetic is float32; a decode step through
engine/cpu_decode.py carries its activations in float32 between the kernels (no narrowing and
widening between ops, and at least as accurate as bf16 activations), while the modules' ops
(prefill) take and give bf16 as the model's dtype. `python -m engine.cpu_kernels --selfcheck`
checks the bf16 kernels against their float32 twins on this machine, whichever path it builds
(AVX512-BF16 dot products, or bf16 weights widened to float32 for FMAs elsewhere).
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
_I32 = ctypes.c_int32
_SIGNATURES = {
    "pd_add_rms_norm": (_P, _P, _P, _P, _P, _I64, _I64, _F32, _I32, _I32),
    "pd_silu_mul": (_P, _P, _I64, _I64, _I32),
    "pd_rotary_cos_sin": (_P, _I32, _I64, _P, _I64, _F32, _P, _P),
    "pd_decode_attention": (_P, _I64, _P, _P, _P, _P, _P, _P, _I64)
    + (_I64,) * 5
    + (_F32, _P, _I32),
    "pd_pack_panels": (_P, _I64, _I64, _P),
    "pd_panel_linear": (_P, _P, _P, _P, _I64, _I64, _I64),
    "pd_pack_panels_bf16": (_P, _I64, _I64, _P),
    "pd_panel_linear_bf16": (_P, _P, _P, _I32, _P, _I64, _I64, _I64),
    "pd_panel_width": (),
    "pd_panel_bf16_dot": (),
}
_DTYPES = (torch.float32, torch.bfloat16)


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
    lib.pd_panel_width.restype = lib.pd_panel_bf16_dot.restype = _I32
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
    """Whether the kernels take this tensor: float32 or bfloat16 on the CPU, with the library
    built."""
    return x.dtype in _DTYPES and x.device.type == "cpu" and not _torch_ops_only and available()


def bf16_dot_products() -> bool:
    """Whether this build's bf16 matmul multiplies in bf16 (AVX512-BF16's `vdpbf16ps`, float32
    x rounded to bf16 first) rather than widening the weights for float32 FMAs."""
    return bool(require().pd_panel_bf16_dot())


def _is_bf16(x: torch.Tensor) -> int:
    return int(x.dtype == torch.bfloat16)


@functools.cache
def panels_pay() -> bool:
    """Whether decode matmuls should run on the panels rather than oneDNN: where the CPU has
    AVX-512 (measured 1.2x oneDNN at 32 rows, 2.3x at one). With AVX2 only, oneDNN's kernels
    beat the panels at decode sizes (1.2-1.6x at 8-32 rows on an AMD EPYC)."""
    return torch.backends.cpu.get_cpu_capability() not in ("DEFAULT", "AVX2")


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + residual), x + residual); without a residual, (norm(x), x). As RMSNorm, in x's
    dtype (float32 or bf16; the residual taken in it too), the weight in either."""
    x = x.contiguous()
    n = x.shape[-1]
    out = torch.empty_like(x)
    total = x
    res_ptr = None
    if residual is not None:
        residual = residual.to(x.dtype).contiguous()
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
        _is_bf16(x),
        _is_bf16(weight),
    )
    return out, total


def pack_panels(weight: torch.Tensor) -> torch.Tensor:
    """A linear's weight `[n, k]` packed for `panel_linear`, in its dtype: float32
    `[ceil(n / width), k, width]`, bf16 `[ceil(n / width), ceil(k / 2), width, 2]` (k in pairs,
    the operand layout of AVX512-BF16's dot product), the width (output columns per panel) the
    kernel was built with."""
    weight = weight.detach().contiguous()
    n, k = weight.shape
    width = require().pd_panel_width()
    if weight.dtype == torch.bfloat16:
        packed = weight.new_empty((-(-n // width), -(-k // 2), width, 2))
        require().pd_pack_panels_bf16(weight.data_ptr(), n, k, packed.data_ptr())
        return packed
    packed = weight.new_empty((-(-n // width), k, width))
    require().pd_pack_panels(weight.data_ptr(), n, k, packed.data_ptr())
    return packed


def panel_linear(
    x: torch.Tensor, packed: torch.Tensor, n: int, bias: torch.Tensor | None
) -> torch.Tensor:
    """`F.linear` at decode batch sizes on a weight packed by `pack_panels` (`n` outputs): each
    output one multiply-add chain over k in order, so a row's result does not depend on how many
    rows share the call. float32 x and result, on float32 or bf16 panels (the bias in the
    weight's dtype). Unchecked (the layers' own tensors): x float32 `[rows, k]`, bias
    contiguous."""
    x = x.contiguous()
    rows, k = x.shape
    out = x.new_empty((rows, n))
    if packed.dtype == torch.bfloat16:
        require().pd_panel_linear_bf16(
            x.data_ptr(),
            packed.data_ptr(),
            None if bias is None else bias.data_ptr(),
            0 if bias is None else _is_bf16(bias),
            out.data_ptr(),
            rows,
            k,
            n,
        )
        return out
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
    """silu(gate) * up of a `[rows, 2 * inter]` gate-up matmul output, in its dtype."""
    gate_up = gate_up.contiguous()
    inter = gate_up.shape[-1] // 2
    out = gate_up.new_empty((*gate_up.shape[:-1], inter))
    require().pd_silu_mul(
        gate_up.data_ptr(), out.data_ptr(), out.numel() // inter, inter, _is_bf16(gate_up)
    )
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

    Unchecked (the layer's own tensors, once per layer per step): qkv, cos and sin float32, the
    caches float32 or bf16 (K/V rounded to it when written, widened when read); qkv rows, cos,
    sin `[B, D]` and the caches contiguous; positions and tables int32."""
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
        _is_bf16(k_cache),
    )
    return out


def selfcheck(seed: int = 0) -> dict[str, float]:
    """Each bf16 kernel against its float32 twin on the same (widened) inputs: the largest error
    in units of the result's scale, by kernel. Raises AssertionError when one is off by more
    than bf16 rounding allows (matmul: float32 rounding; bf16 results: one rounding). Quick and
    self-contained (torch and a C compiler), to run on a machine of another CPU kind:
    `python -m engine.cpu_kernels --selfcheck`."""
    gen = torch.Generator().manual_seed(seed)
    errors: dict[str, float] = {}

    def check(name: str, got: torch.Tensor, want: torch.Tensor, limit: float) -> None:
        scale = want.double().abs().max().item() or 1.0
        errors[name] = (got.double() - want.double()).abs().max().item() / scale
        assert errors[name] <= limit, f"{name}: error {errors[name]:.3g} of scale > {limit:.3g}"

    n, k, rows = 100, 257, 13  # a partial panel, an odd k, a partial register tile
    weight = torch.randn(n, k, generator=gen).bfloat16()
    bias = torch.randn(n, generator=gen).bfloat16()
    x = torch.randn(rows, k, generator=gen)
    x_in = x.bfloat16().float() if bf16_dot_products() else x  # what the matmul multiplies
    want = panel_linear(x_in, pack_panels(weight.float()), n, bias.float())
    got = panel_linear(x, pack_panels(weight), n, bias)
    check("panel_linear", got, want, 1e-5)

    hidden = 576
    h = (torch.randn(rows, hidden, generator=gen) * 3).bfloat16()
    res = torch.randn(rows, hidden, generator=gen).bfloat16()
    norm = torch.randn(hidden, generator=gen).bfloat16()
    out, total = rms_norm(h, norm, 1e-5, res)
    total_want = (h.float() + res.float()).bfloat16()
    check("rms_norm sum", total, total_want, 0.0)
    check("rms_norm", out, rms_norm(total_want.float(), norm.float(), 1e-5, None)[0], 2**-8)
    # Decode: float32 activations, a bf16 weight.
    out32, _ = rms_norm(h.float(), norm, 1e-5, res.float())
    check("rms_norm f32/bf16", out32, rms_norm(h.float(), norm.float(), 1e-5, res.float())[0], 0)

    gate_up = (torch.randn(rows, 2 * 688, generator=gen) * 4).bfloat16()
    check("silu_mul", silu_mul(gate_up), silu_mul(gate_up.float()), 2**-8)

    heads, kv_heads, dim, page_size = 9, 3, 64, 16
    positions = torch.tensor([1, 15, 16, 70, 300], dtype=torch.int32)
    pages = -(-(int(positions.max()) + 1) // page_size)
    tables = torch.arange(len(positions) * pages, dtype=torch.int32).view(len(positions), pages)
    slots = len(positions) * pages * page_size
    k_cache = torch.randn(slots, kv_heads, dim, generator=gen).bfloat16()
    v_cache = torch.randn(slots, kv_heads, dim, generator=gen).bfloat16()
    qkv = torch.randn(len(positions), (heads + 2 * kv_heads) * dim, generator=gen)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, dim, 2).float() / dim)
    cos, sin = rotary_cos_sin(positions, inv_freq, 1.0)
    k32, v32 = k_cache.float(), v_cache.float()
    args = (positions, tables, page_size, heads)
    want = decode_attention(qkv, cos, sin, k32, v32, *args)
    got = decode_attention(qkv, cos, sin, k_cache, v_cache, *args)
    check("decode_attention", got, want, 2**-7)  # the new token's K/V read rounded
    check("decode_attention K write", k_cache, k32.bfloat16(), 0.0)
    check("decode_attention V write", v_cache, v32.bfloat16(), 0.0)
    return errors


def _main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="the engine's native CPU kernels")
    parser.add_argument("--selfcheck", action="store_true", help="bf16 kernels vs float32")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    require()
    if args.selfcheck:
        path = "vdpbf16ps (AVX512-BF16)" if bf16_dot_products() else "bf16 widened to float32"
        log.info("bf16 matmul: %s", path)
        for name, error in selfcheck().items():
            log.info("%-26s ok, max error %.3g of scale", name, error)


if __name__ == "__main__":
    _main()
