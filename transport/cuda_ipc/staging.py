"""Where a request's run table waits for the GPU: slots of mapped pinned host memory, and per
slot the event that tells when the copy which read it has finished (`SlotDone`)."""

from __future__ import annotations

import ctypes
import logging
import threading
import weakref
from typing import Any

import torch

from transport.cuda_ipc.kernels import _TABLE_WORDS

log = logging.getLogger(__name__)


class _Staging:
    """Per-request run tables in mapped pinned host memory, one slot each, and per slot a raw
    event that ends the copy which read it.

    The GPU reads a slot where it lies (a graph's table node, or the direct kernel), so a
    request writes its table through a memoryview and makes no upload call. A slot is written
    again only after the copy that read it has finished (its event), so a table is never
    overwritten under a copy still queued behind the caller's compute. Generations tell a
    request's end from a later one on the same slot: `passed` never reports a request done
    early, and once any poll saw a slot's event pass, taking the slot again costs no CUDA call.

    A request takes the lowest slot known free, not the next one round the ring: requests that
    come one at a time then launch the same slot's graph each time, whose driver state is still
    in the CPU's caches (benchmarks/gpu/NOTES_transport.md has the figures). Only when every
    slot is busy does a request wait, for the oldest copy.
    """

    SLOTS = 16
    ROWS = 4096  # runs per request that fit a slot; more take a one-off device table

    def __init__(self, runtime: Any, device: torch.device) -> None:
        self._runtime = runtime
        self.words = 2 * ((1 + 3 * self.ROWS + 1) // 2)  # a slot's stride: 16-byte aligned
        # One more slot, always zero (no runs): the graphs' kernels are compiled against it.
        count = self.words * (self.SLOTS + 1)
        host, mapped = runtime.host_alloc_mapped(8 * count)
        ctypes.memset(host, 0, 8 * count)
        # Per slot its words as a memoryview: a request writes its table without numpy.
        words = memoryview((ctypes.c_int64 * count).from_address(host)).cast("B").cast("q")
        self.views = [words[i * self.words : (i + 1) * self.words] for i in range(self.SLOTS)]
        self.addresses = [mapped + 8 * self.words * i for i in range(self.SLOTS + 1)]
        self.empty = self.addresses[self.SLOTS]
        # The graphs' tables in device memory, a slot each (`_table_kernel` fills them).
        self.device = torch.zeros((self.SLOTS, _TABLE_WORDS), dtype=torch.int64, device=device)
        self.device_rows = [self.device[i] for i in range(self.SLOTS)]
        self.events = [runtime.event_create() for _ in range(self.SLOTS)]
        self._gens = [0] * self.SLOTS  # requests that took each slot
        self._passed = [0] * self.SLOTS  # of those, how many are known to have finished
        self._taken = [0] * self.SLOTS  # when each slot was last taken (a count of takes)
        self._takes = 0
        self.lock = threading.Lock()  # held from `take` to the record: one slot, one request
        finalizer = weakref.finalize(self, _free_staging, runtime, host, tuple(self.events))
        finalizer.atexit = False  # at exit the process's memory goes anyway

    def take(self) -> tuple[int, int]:
        """The lowest free slot and this request's generation on it; the caller holds `lock`."""
        gens, passed = self._gens, self._passed
        for i in range(self.SLOTS):
            if passed[i] >= gens[i]:
                break
        else:  # 16 requests still queued behind compute: wait for the oldest
            i = min(range(self.SLOTS), key=self._taken.__getitem__)
            self.wait(i, gens[i])
        self._takes += 1
        self._taken[i] = self._takes
        gens[i] += 1
        return i, gens[i]

    def passed(self, slot: int, gen: int) -> bool:
        """Whether request `gen` of `slot` has finished (never blocks)."""
        if self._passed[slot] >= gen:
            return True
        # The event's last record is this request's or, if the slot was taken again since,
        # a later one's (taken only after this one passed): ready means this one is done.
        if not self._runtime.event_query(self.events[slot]):
            return False
        self._note(slot, gen)
        return True

    def wait(self, slot: int, gen: int) -> None:
        """Block until request `gen` of `slot` has finished."""
        if self._passed[slot] < gen:
            self._runtime.event_synchronize(self.events[slot])
            self._note(slot, gen)

    def _note(self, slot: int, gen: int) -> None:
        if self._passed[slot] < gen:
            self._passed[slot] = gen


def _free_staging(runtime: Any, host: int, events: tuple[int, ...]) -> None:
    try:
        for event in events:
            runtime.event_destroy(event)
        runtime.free_host(host)
    except Exception:  # freeing at teardown: nothing to keep
        log.debug("freeing fast-path staging failed", exc_info=True)


class SlotDone:
    """The end of one request's copy launched over a route: its slot's event, this request's
    generation on it. Duck-types `torch.cuda.Event` (`query`, `synchronize`)."""

    __slots__ = ("gen", "slot", "staging")

    def __init__(self, staging: _Staging, slot: int, gen: int) -> None:
        self.staging = staging
        self.slot = slot
        self.gen = gen

    def query(self) -> bool:
        return self.staging.passed(self.slot, self.gen)

    def synchronize(self) -> None:
        self.staging.wait(self.slot, self.gen)
