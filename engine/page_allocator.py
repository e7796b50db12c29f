"""KV page accounting: which pages of a cache are free, and which pages each request holds.

The allocator only counts and hands out page indices; it never touches tensors. Accounting is
exact: freeing a page that is not in use raises, so a double free is found where it happens.

Free pages are kept as runs of consecutive indices, because the transport writes one Mooncake
segment per run of a request's pages per layer per K/V (`transport.segments`): a FIFO of single
pages scattered a long prompt after some churn into hundreds of runs, thousands of segments,
more than Mooncake's tcp transport takes in one batch. So a request gets the lowest-addressed
free run that holds it whole (first fit), or else the fewest runs that add up to it (the largest
first); a single page (decode growth) is the lowest free page; a freed page merges with its free
neighbours. Runs are two parallel lists sorted by start: bisect finds a page's neighbours, and a
many-page allocation scans the run lengths once, so nothing costs O(num_pages).

A page may have several holders: the n choices of one prompt decode on the prompt's full pages
(`share` adds a holder), and a page goes back to the free runs when its last holder frees it.
Only pages nobody writes any more may be shared (full prompt pages); a holder that writes gets
its own copy first. Extra holders are counted in a dict keyed by page, so unshared pages (nearly
all of them) cost nothing more, and `num_in_use` counts each page once.

A decode replica's engine step runs in a worker thread while its event loop frees pages (a
request that ends before joining, quarantined pages coming back), so every state change and
every count is taken under one lock. A sequence of calls (`can_allocate`, then `allocate`) is
not atomic: only one thread may allocate against a check it made (the engine's scheduler, or the
event loop between steps), while frees may come from anywhere.
"""

from __future__ import annotations

import bisect
import collections
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

from engine.errors import OutOfPagesError, PageAccountingError


class PageAllocator:
    """Hands out page indices in `[0, num_pages)`, each request's in as few runs as it can."""

    def __init__(self, num_pages: int) -> None:
        if num_pages <= 0:
            raise ValueError(f"num_pages must be positive, got {num_pages}")
        self.num_pages = num_pages
        # Free run i is pages [starts[i], starts[i] + lengths[i]); runs never touch (they merge).
        self._starts: list[int] = [0]
        self._lengths: list[int] = [num_pages]
        self._num_free = num_pages
        # Holders beyond the first, for shared pages only (a page with none is absent).
        self._extra_holders: dict[int, int] = {}
        # Uncontended, a `with` on it costs about 0.1 us: nothing next to a step.
        self._lock = threading.Lock()

    @property
    def num_free(self) -> int:
        with self._lock:
            return self._num_free

    @property
    def num_in_use(self) -> int:
        with self._lock:
            return self.num_pages - self._num_free

    def can_allocate(self, count: int) -> bool:
        with self._lock:
            return count <= self._num_free

    def allocate(self, count: int) -> list[int]:
        """`count` pages in ascending order: consecutive indices in the list form the runs."""
        if count < 0:
            raise ValueError(f"cannot allocate {count} pages")
        with self._lock:
            if count > self._num_free:
                raise OutOfPagesError(f"asked for {count} KV pages, {self._num_free} free")
            if count == 0:
                return []
            # From the highest run down, so taking a run whole does not shift those still to take.
            takes = sorted(self._runs_to_take(count), reverse=True)
            pieces = [self._take_front(i, n) for i, n in takes]
            self._num_free -= count
        # Pieces of different runs never touch, so ascending order keeps each one a run.
        return [page for start, n in sorted(pieces) for page in range(start, start + n)]

    def share(self, pages: Iterable[int], holders: int = 1) -> None:
        """Adds `holders` holders to each of `pages`, all in use; each holder frees them once."""
        ordered = sorted(pages)
        if holders < 0:
            raise ValueError(f"cannot add {holders} holders")
        with self._lock:
            not_in_use = [p for p in ordered if not self._in_use(p, 1)]
            if not_in_use:
                raise PageAccountingError(f"sharing pages not in use: {not_in_use}")
            if holders:
                for page in ordered:
                    self._extra_holders[page] = self._extra_holders.get(page, 0) + holders

    def holders(self, page: int) -> int:
        """How many holders an in-use page has (0 if free)."""
        with self._lock:
            if not self._in_use(page, 1):
                return 0
            return 1 + self._extra_holders.get(page, 0)

    def free(self, pages: Iterable[int]) -> None:
        """Drops one holder per occurrence of a page; pages left with none become free."""
        counts = collections.Counter(pages)
        with self._lock:
            extra = self._extra_holders
            # A page freed c times by holders that hold it: extra holders >= c - 1.
            over = [p for p, c in counts.items() if c - 1 > extra.get(p, 0)]
            not_in_use = [
                page
                for start, n in _consecutive_chunks(sorted(counts))
                if not self._in_use(start, n)
                for page in range(start, start + n)
                if not self._in_use(page, 1)
            ]
            if over or not_in_use:
                raise PageAccountingError(
                    f"freeing pages not in use (double free?): {sorted(set(over + not_in_use))}"
                )
            last: list[int] = []
            for page, c in counts.items():
                left = extra.get(page, 0) - c
                if left >= 0:
                    if left:
                        extra[page] = left
                    else:
                        del extra[page]
                else:  # its last holder
                    extra.pop(page, None)
                    last.append(page)
            for start, n in _consecutive_chunks(sorted(last)):
                self._give_back(start, n)
            self._num_free += len(last)

    # -- runs (under the lock) ----------------------------------------------------------------

    def _runs_to_take(self, count: int) -> list[tuple[int, int]]:
        """(run index, pages from its front) for `count` pages: the lowest run that holds them
        all, else the largest runs (lowest first among equals) until they add up."""
        lengths = self._lengths
        first_fit = next((i for i, n in enumerate(lengths) if n >= count), None)
        if first_fit is not None:
            return [(first_fit, count)]
        takes = []
        for i in sorted(range(len(lengths)), key=lengths.__getitem__, reverse=True):  # stable
            takes.append((i, min(count, lengths[i])))
            count -= lengths[i]
            if count <= 0:
                break
        return takes

    def _take_front(self, i: int, count: int) -> tuple[int, int]:
        """The first `count` pages of free run `i`, as (start, count)."""
        start = self._starts[i]
        if count == self._lengths[i]:
            del self._starts[i], self._lengths[i]
        else:
            self._starts[i] += count
            self._lengths[i] -= count
        return start, count

    def _in_use(self, start: int, count: int) -> bool:
        """Whether pages [start, start + count) are all in the cache and none of them free."""
        if start < 0 or start + count > self.num_pages:
            return False
        i = bisect.bisect_right(self._starts, start) - 1  # the last run starting at or before
        ends_before = i < 0 or self._starts[i] + self._lengths[i] <= start
        next_after = i + 1 == len(self._starts) or self._starts[i + 1] >= start + count
        return ends_before and next_after

    def _give_back(self, start: int, count: int) -> None:
        """Make [start, start + count), all in use, a free run, merged with the runs it touches."""
        starts, lengths = self._starts, self._lengths
        i = bisect.bisect_left(starts, start)  # the run after; i - 1 is the run before
        touches_before = i > 0 and starts[i - 1] + lengths[i - 1] == start
        touches_after = i < len(starts) and starts[i] == start + count
        if touches_before and touches_after:
            lengths[i - 1] += count + lengths[i]
            del starts[i], lengths[i]
        elif touches_before:
            lengths[i - 1] += count
        elif touches_after:
            starts[i] = start
            lengths[i] += count
        else:
            starts.insert(i, start)
            lengths.insert(i, count)


def _consecutive_chunks(pages: list[int]) -> list[tuple[int, int]]:
    """Sorted pages as (start, count) chunks of consecutive indices."""
    chunks: list[tuple[int, int]] = []
    for page in pages:
        if chunks and page == chunks[-1][0] + chunks[-1][1]:
            chunks[-1] = (chunks[-1][0], chunks[-1][1] + 1)
        else:
            chunks.append((page, 1))
    return chunks


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
