"""One peer's allocations as mapped into this process, and when they may be unmapped."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable

import numpy as np
import torch

from transport.cuda_ipc.backend import IpcBackend
from transport.cuda_ipc.driver import IpcOpenError
from transport.cuda_ipc.routes import PageRoute
from transport.receiver_info import IpcAllocation

log = logging.getLogger(__name__)


class PeerMapping:
    """One peer's opened allocations; closing waits for the copies that are using them."""

    def __init__(
        self, session: str, device: torch.device, backend: IpcBackend, same_device: bool
    ) -> None:
        self.session = session
        self.device = device  # ours, where the copies run and the handles are opened
        self.same_device = same_device  # the peer's KV is on our GPU (else a peer GPU)
        self._backend = backend
        self._opened: dict[str, tuple[IpcAllocation, int]] = {}  # handle -> (it, mapped base)
        self._bases = np.empty(0, np.int64)  # the peer's allocation bases, sorted
        self._ends = np.empty(0, np.int64)
        self._mapped = np.empty(0, np.int64)  # where each is mapped here
        self.routes: dict[tuple, PageRoute | None] = {}  # worked out once per layer set
        self._users = 0  # copies holding it open: it unmaps after the last, once closed
        self._closed = False
        self._lock = threading.Lock()

    def open_all(self, allocations: Iterable[IpcAllocation]) -> None:
        """Open what is not open yet; on failure nothing new stays open."""
        with self._lock:
            new = [a for a in allocations if a.handle not in self._opened]
            done: list[tuple[IpcAllocation, int]] = []
            try:
                for a in new:
                    done.append((a, self._backend.open(a, self.device)))
            except IpcOpenError:
                for _, address in done:
                    self._close_one(address)
                raise
            for a, address in done:
                self._opened[a.handle] = (a, address)
            self._index()

    def _index(self) -> None:
        ordered = sorted(self._opened.values(), key=lambda o: o[0].base)
        self._bases = np.array([a.base for a, _ in ordered], np.int64)
        self._ends = np.array([a.base + a.nbytes for a, _ in ordered], np.int64)
        self._mapped = np.array([address for _, address in ordered], np.int64)

    def translate(self, dsts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Where the peer's `[dst, dst + length)` ranges are mapped here, and which are."""
        i = np.searchsorted(self._bases, dsts, side="right") - 1
        inside = i >= 0
        j = np.where(inside, i, 0)
        if len(self._bases):
            inside &= dsts + lengths <= self._ends[j]
            return np.where(inside, self._mapped[j] + (dsts - self._bases[j]), 0), inside
        return np.zeros_like(dsts), np.zeros(len(dsts), bool)

    def acquire(self) -> bool:
        with self._lock:
            if self._closed:
                return False
            self._users += 1
            return True

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            unmap = self._closed and self._users == 0
        if unmap:
            self._unmap()

    def close(self) -> None:
        """Unmap now, or when the last running copy releases. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            unmap = self._users == 0
        if unmap:
            self._unmap()

    def _unmap(self) -> None:
        with self._lock:
            opened, self._opened = list(self._opened.values()), {}
            self._index()
            self.routes.clear()
        for _, address in opened:
            self._close_one(address)

    def _close_one(self, address: int) -> None:
        try:
            self._backend.close(address, self.device)
        except Exception:  # a dead peer's handle may not close cleanly; nothing to keep
            log.warning("closing a CUDA IPC mapping of %s failed", self.session, exc_info=True)
