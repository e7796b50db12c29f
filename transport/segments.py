"""Turning a request's pages into the fewest Mooncake write segments.

Pages that are consecutive on both sides form a run, and a run of K (or V) of one layer is one
contiguous byte range on each side, hence one segment. Pages come from allocators that hand
out low indices first, so runs are long in practice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from engine.kv_cache import KVLayerRegion
from transport.receiver_info import LayerAddress


@dataclass(frozen=True)
class PageRun:
    local: int
    remote: int
    length: int


def page_run_bounds(local: np.ndarray, remote: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Maximal runs where both the local and the remote page index step by one: where each run
    starts (an index into both int64 arrays, of one length) and how many pages it holds.

    The one definition of a run: Mooncake's segments (`page_runs`) and the fast path's copies
    (`transport.cuda_ipc.routes.plan_runs`) both build on it, so the two paths cut a request
    into the same pieces. Vectorised, because the fast path plans on the caller's thread.
    """
    if len(local) == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    breaks = np.flatnonzero((np.diff(local) != 1) | (np.diff(remote) != 1)) + 1
    starts = np.concatenate(([0], breaks))
    return starts, np.diff(np.concatenate((starts, [len(local)])))


def page_runs(local: list[int], remote: list[int]) -> list[PageRun]:
    """Maximal runs where both the local and the remote page index step by one
    (`page_run_bounds`), as page indices."""
    if len(local) != len(remote):
        raise ValueError(f"{len(local)} local pages but {len(remote)} remote pages")
    # The usual request is one run on both sides: a list compare answers it at C speed, where
    # numpy's fixed cost per call would dominate a short request (so does `plan_pages`).
    if len(local) and _one_run(local) and _one_run(remote):
        return [PageRun(local[0], remote[0], len(local))]
    ours, theirs = np.asarray(local, np.int64), np.asarray(remote, np.int64)
    starts, lengths = page_run_bounds(ours, theirs)
    return [
        PageRun(*run)
        for run in zip(
            ours[starts].tolist(), theirs[starts].tolist(), lengths.tolist(), strict=True
        )
    ]


def _one_run(pages: list[int]) -> bool:
    """Whether every page index of a (non-empty) list is one more than the one before."""
    if type(pages) is not list:
        return False
    first = pages[0]
    return pages[-1] == first + len(pages) - 1 and pages == list(range(first, first + len(pages)))


@dataclass
class Segments:
    """Parallel lists in the shape `batch_transfer_*_write` takes."""

    srcs: list[int] = field(default_factory=list)
    dsts: list[int] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)

    def add(self, src: int, dst: int, length: int) -> None:
        self.srcs.append(src)
        self.dsts.append(dst)
        self.lengths.append(length)

    @property
    def nbytes(self) -> int:
        return sum(self.lengths)

    def __len__(self) -> int:
        return len(self.srcs)


def kv_segments(
    local: list[KVLayerRegion],
    remote: dict[int, LayerAddress],
    local_pages: list[int],
    remote_pages: list[int],
    page_nbytes: int,
) -> Segments:
    """Segments that copy K and V of `local_pages` of every local layer to `remote_pages`."""
    runs = page_runs(local_pages, remote_pages)
    out = Segments()
    for region in local:
        dst = remote[region.layer]
        # A run spans contiguous bytes only where a page's stride equals its size.
        contiguous = region.page_stride == page_nbytes and dst.page_stride == page_nbytes
        for kv in (0, 1):
            src_base = region.base_address + kv * region.kv_stride
            dst_base = dst.base + kv * dst.kv_stride
            for run in runs:
                if contiguous:
                    out.add(
                        src_base + run.local * region.page_stride,
                        dst_base + run.remote * dst.page_stride,
                        run.length * page_nbytes,
                    )
                    continue
                for k in range(run.length):
                    out.add(
                        src_base + (run.local + k) * region.page_stride,
                        dst_base + (run.remote + k) * dst.page_stride,
                        page_nbytes,
                    )
    return out
