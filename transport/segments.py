"""Turning a request's pages into the fewest Mooncake write segments.

Pages that are consecutive on both sides form a run, and a run of K (or V) of one layer is one
contiguous byte range on each side, hence one segment. Pages come from allocators that hand
out low indices first, so runs are long in practice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.kv_cache import KVLayerRegion
from transport.receiver_info import LayerAddress


@dataclass(frozen=True)
class PageRun:
    local: int
    remote: int
    length: int


def page_runs(local: list[int], remote: list[int]) -> list[PageRun]:
    """Maximal runs where both the local and the remote page index step by one."""
    if len(local) != len(remote):
        raise ValueError(f"{len(local)} local pages but {len(remote)} remote pages")
    runs: list[PageRun] = []
    i = 0
    while i < len(local):
        j = i + 1
        while j < len(local) and local[j] == local[j - 1] + 1 and remote[j] == remote[j - 1] + 1:
            j += 1
        runs.append(PageRun(local[i], remote[i], j - i))
        i = j
    return runs


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
