"""KV page accounting: which pages of a cache are free, and which pages each request holds.

The allocator only counts and hands out page indices; it never touches tensors. Accounting is
exact: freeing a page that is not in use raises, so a double free is found where it happens.

A decode replica's engine step runs in a worker thread while its event loop frees pages (a
request that ends before joining, quarantined pages coming back), so every state change and
every count is taken under one lock. A sequence of calls (`can_allocate`, then `allocate`) is
not atomic: only one thread may allocate against a check it made (the engine's scheduler, or the
event loop between steps), while frees may come from anywhere.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from engine.errors import OutOfPagesError, PageAccountingError


class PageAllocator:
    """Hands out page indices in `[0, num_pages)`; O(1) allocate and free per page."""

    def __init__(self, num_pages: int) -> None:
        if num_pages <= 0:
            raise ValueError(f"num_pages must be positive, got {num_pages}")
        self.num_pages = num_pages
        self._free: deque[int] = deque(range(num_pages))
        self._in_use: set[int] = set()
        # Uncontended, a `with` on it costs about 0.1 us: nothing next to a step.
        self._lock = threading.Lock()

    @property
    def num_free(self) -> int:
        with self._lock:
            return len(self._free)

    @property
    def num_in_use(self) -> int:
        with self._lock:
            return len(self._in_use)

    def can_allocate(self, count: int) -> bool:
        with self._lock:
            return count <= len(self._free)

    def allocate(self, count: int) -> list[int]:
        if count < 0:
            raise ValueError(f"cannot allocate {count} pages")
        with self._lock:
            free = self._free
            if count > len(free):
                raise OutOfPagesError(f"asked for {count} KV pages, {len(free)} free")
            pages = [free.popleft() for _ in range(count)]
            self._in_use.update(pages)
        return pages

    def free(self, pages: Iterable[int]) -> None:
        pages = list(pages)
        with self._lock:
            in_use = self._in_use
            bad = [p for p in pages if p not in in_use]
            if bad or len(set(pages)) != len(pages):
                raise PageAccountingError(
                    f"freeing pages not in use (double free?): {sorted(bad or pages)}"
                )
            in_use.difference_update(pages)
            self._free.extend(pages)


def pages_needed(num_tokens: int, page_size: int) -> int:
    return -(-num_tokens // page_size)


@dataclass
class PageTable:
    """The pages one request holds in one KV cache, in token order."""

    page_size: int
    pages: list[int] = field(default_factory=list)

    @property
    def capacity(self) -> int:
        return len(self.pages) * self.page_size

    def grow_to(self, num_tokens: int, allocator: PageAllocator) -> None:
        """Make room for `num_tokens` tokens in total; raises OutOfPagesError, holding nothing new."""
        missing = pages_needed(num_tokens, self.page_size) - len(self.pages)
        if missing > 0:
            self.pages.extend(allocator.allocate(missing))

    def pages_to_grow(self, num_tokens: int) -> int:
        return max(0, pages_needed(num_tokens, self.page_size) - len(self.pages))

    def release(self, allocator: PageAllocator) -> None:
        """Free every page; idempotent, so every failure path may call it."""
        if self.pages:
            pages, self.pages = self.pages, []
            allocator.free(pages)

    def slot(self, position: int) -> int:
        """Flat slot index (`page * page_size + offset`) of the token at `position`."""
        return self.pages[position // self.page_size] * self.page_size + position % self.page_size
