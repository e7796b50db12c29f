"""The Triton kernels that copy KV pages (Triton ships with CUDA torch), the geometry they are
launched with, and the general path's copy list (`Copies`).

Each kernel is compiled on first use and cached: importing this module needs no GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Copies:
    """One request's device-to-device runs: absolute source, mapped destination, bytes."""

    srcs: np.ndarray  # int64
    dsts: np.ndarray  # int64, addresses in this process (the peer's memory as mapped here)
    lengths: np.ndarray  # int64

    def __len__(self) -> int:
        return len(self.srcs)


@cache
def _copy_kernel() -> Any:
    """A Triton kernel copying every run of a table in one launch (Triton ships with CUDA torch)."""
    import triton
    import triton.language as tl

    @triton.jit
    def copy_runs(table, BLOCK: tl.constexpr, WIDE: tl.constexpr):
        # One row per run: source address, destination address, length in elements.
        row = table + tl.program_id(0) * 3
        if WIDE:  # every address and length a multiple of 8: 8-byte elements
            src = tl.load(row).to(tl.pointer_type(tl.int64))
            dst = tl.load(row + 1).to(tl.pointer_type(tl.int64))
        else:
            src = tl.load(row).to(tl.pointer_type(tl.int8))
            dst = tl.load(row + 1).to(tl.pointer_type(tl.int8))
        n = tl.load(row + 2)
        offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n  # programs past a shorter run's end do nothing
        tl.store(dst + offs, tl.load(src + offs, mask=mask), mask=mask)

    return copy_runs


@cache
def _page_kernel() -> Any:
    """The route's copy: a program per (layer x K/V row, page run, block of the run)."""
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["work_address"])
    def copy_pages(bases, work_address, BLOCK: tl.constexpr):
        # bases: per row the source and (mapped) destination start of one layer's K or V, in
        # bytes, 8-byte aligned. work_address: the run table (`_work`), read where it lies:
        # mapped pinned host memory (a staging slot) or device memory. Per run the source
        # offset, destination offset and length, in 8-byte elements. An address, not a
        # tensor, and not specialised: the same compiled kernel for every slot.
        work = work_address.to(tl.int64).to(tl.pointer_type(tl.int64))
        row = bases + tl.program_id(0) * 2
        src = tl.load(row).to(tl.pointer_type(tl.int64))
        dst = tl.load(row + 1).to(tl.pointer_type(tl.int64))
        run = work + 1 + tl.program_id(1) * 3  # work[0] is the count (see `_work`)
        n = tl.load(run + 2)
        offs = tl.program_id(2).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n  # programs past a shorter run's end do nothing
        values = tl.load(src + tl.load(run) + offs, mask=mask)
        tl.store(dst + tl.load(run + 1) + offs, values, mask=mask)

    return copy_pages


@cache
def _table_kernel() -> Any:
    """A graph's first node: its slot's run table from mapped host memory into device memory,
    in one read over PCIe, so the copy's programs read it from L2: read from host memory by
    every program, each run would cost each program a dependent PCIe round trip (a scattered
    request has up to 64 runs)."""
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["host_address"])
    def load_table(host_address, table, WORDS: tl.constexpr):
        host = host_address.to(tl.int64).to(tl.pointer_type(tl.int64))
        offs = tl.arange(0, WORDS)
        tl.store(table + offs, tl.load(host + offs))

    return load_table


@cache
def _graph_kernel() -> Any:
    """The route's copy on a fixed grid (layer x K/V row, GROUP), for a CUDA graph: how many runs
    and how long each is comes from the table at run time, so one captured launch serves every
    request; run r's blocks go to programs r, r + 1, ... (mod GROUP) so short runs spread."""
    import triton
    import triton.language as tl

    @triton.jit
    def copy_pages_fixed(bases, work, BLOCK: tl.constexpr, GROUP: tl.constexpr):
        row = bases + tl.program_id(0) * 2
        src = tl.load(row).to(tl.pointer_type(tl.int64))
        dst = tl.load(row + 1).to(tl.pointer_type(tl.int64))
        g = tl.program_id(1).to(tl.int64)
        count = tl.load(work)
        for r in range(0, count):
            run = work + 1 + r * 3
            s_off = tl.load(run)
            d_off = tl.load(run + 1)
            n = tl.load(run + 2)
            first = (g - r % GROUP + GROUP) % GROUP
            for part in range(first, (n + BLOCK - 1) // BLOCK, GROUP):
                offs = part * BLOCK + tl.arange(0, BLOCK)
                mask = offs < n
                values = tl.load(src + s_off + offs, mask=mask)
                tl.store(dst + d_off + offs, values, mask=mask)

    return copy_pages_fixed


_BLOCK = 4096  # elements per program: 32 KiB of 8-byte elements
_MAX_PARTS = 65535  # the grid's second dimension: runs up to 2 GiB (one layer's K is far less)
_MAX_RUNS = 65535  # a route's grid: runs in the second dimension
_GROUP = 64  # the graph kernel's programs per row
# What a graph's table node copies: the count and 3 words per run for up to 85 runs, so every
# request a graph takes (`backend._GRAPH_RUNS`) fits.
_TABLE_WORDS = 256
