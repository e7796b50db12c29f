"""How one sender's layers reach one peer's layers (`PageRoute`, worked out once per peer and
layer set) and one request's page runs over such a route (`PageRuns`, `plan_runs`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from transport.cuda_ipc.kernels import _MAX_RUNS
from transport.segments import page_run_bounds


@dataclass
class PageRoute:
    """How one sender's layers reach one peer's layers, worked out once and reused per request.

    Rows are (layer, K or V) in the sender's layer order; both sides hold pages contiguously
    (page stride = page size), so a run of pages is one range per row on each side.
    """

    src_bases: np.ndarray  # int64 per row: where K or V of the layer starts here
    dst_bases: np.ndarray  # int64 per row: where it starts on the peer, as mapped here
    page_words: int  # 8-byte elements per page of K or V
    local_pages: int  # pages each local layer holds (page indices must be below)
    remote_pages: int  # likewise on the peer
    table: Any = None  # the backend's copy of (src_bases, dst_bases): a device tensor on CUDA
    _numbers: list[int] | None = None  # 0 .. local_pages - 1, built once (`page_numbers`)

    @property
    def rows(self) -> int:
        return len(self.src_bases)

    def page_numbers(self, first: int, n: int) -> list[int]:
        """`list(range(first, first + n))` as a slice of a list built once: comparing a
        request's pages against it checks one run without creating n int objects."""
        if self._numbers is None:
            self._numbers = list(range(self.local_pages))
        return self._numbers[first : first + n]


class PageRuns:
    """One request's page runs over a route: per run (source offset, destination offset,
    length) in 8-byte elements, kept as one flat tuple of Python ints.

    Not numpy, on purpose: a request is launched by a thread that has usually just woken (it
    waited for the GPU or for a message), and there every numpy call costs several times its
    hot price before any work (benchmarks/gpu/NOTES_transport.md). A one-run request (the
    usual case) makes no numpy call at all; planning several runs does (`plan_runs`).
    """

    __slots__ = ("flat",)

    def __init__(self, flat: tuple[int, ...]) -> None:
        self.flat = flat

    @classmethod
    def of(cls, rows: np.ndarray) -> PageRuns:
        """From rows of (source offset, destination offset, length)."""
        return cls(tuple(rows.reshape(-1).tolist()))

    def __len__(self) -> int:
        return len(self.flat) // 3

    @property
    def words(self) -> int:
        """8-byte elements moved per (layer, K or V) row."""
        return sum(self.flat[2::3])

    @property
    def longest(self) -> int:
        return max(self.flat[2::3], default=0)

    def rows(self) -> np.ndarray:
        return np.array(self.flat, np.int64).reshape(-1, 3)


def plan_runs(route: PageRoute, local_pages: list[int], remote: np.ndarray) -> PageRuns | None:
    """Page runs (`page_run_bounds`, as Mooncake's segments are cut) for local page
    `local_pages[i]` to go to `remote[i]`; None when the route cannot take them."""
    n = len(local_pages)
    if n > len(remote):
        return None
    if n == 0:
        return PageRuns(())
    local = np.array(local_pages, np.int64)
    theirs = remote[:n]
    if local.min() < 0 or local.max() >= route.local_pages:
        return None
    if theirs.min() < 0 or theirs.max() >= route.remote_pages:
        return None
    starts, lengths = page_run_bounds(local, theirs)
    if len(starts) > _MAX_RUNS:
        return None
    runs = np.empty((len(starts), 3), np.int64)
    runs[:, 0] = local[starts] * route.page_words
    runs[:, 1] = theirs[starts] * route.page_words
    runs[:, 2] = lengths * route.page_words
    return PageRuns.of(runs)
