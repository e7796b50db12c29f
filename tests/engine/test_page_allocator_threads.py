"""The page allocator shared by two threads, as on a decode replica: the engine step allocates
and frees in a worker thread while the event loop frees (and, between steps, allocates)."""

from __future__ import annotations

import random
import sys
import threading
from collections.abc import Iterator

import pytest

from engine import PageAccountingError, PageAllocator
from engine.errors import OutOfPagesError

NUM_PAGES = 64


@pytest.fixture
def frequent_thread_switches() -> Iterator[None]:
    """Switch threads every few bytecodes, so that a check and its act get interleaved."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(before)


class Holder:
    """One thread's pages; the other thread checks every page it gets against them (no lock:
    a page leaves `pages` before it goes back to the allocator, so a hit is a real double
    hand-out, and the checker itself cannot serialize the threads and hide a race)."""

    def __init__(self) -> None:
        self.pages: set[int] = set()
        self.got_pages_held_by_the_other: list[int] = []


def churn(
    alloc: PageAllocator,
    me: Holder,
    other: Holder,
    rounds: int,
    seed: int,
    errors: list[BaseException],
) -> None:
    rng = random.Random(seed)
    held: list[list[int]] = []
    try:
        for _ in range(rounds):
            if held and rng.random() < 0.5:
                pages = held.pop(rng.randrange(len(held)))
                me.pages.difference_update(pages)
                alloc.free(pages)
                continue
            count = rng.randint(1, 12)  # often more than is free: the edge of exhaustion
            try:
                pages = alloc.allocate(count)
            except OutOfPagesError:
                continue
            assert len(pages) == count == len(set(pages))
            me.got_pages_held_by_the_other += [p for p in pages if p in other.pages]
            me.pages.update(pages)
            held.append(pages)
        for pages in held:
            me.pages.difference_update(pages)
            alloc.free(pages)
    except BaseException as exc:  # reported by the test, not lost in the thread
        errors.append(exc)


def test_two_threads_never_get_the_same_page_and_end_with_none_in_use(
    frequent_thread_switches: None,
) -> None:
    alloc = PageAllocator(NUM_PAGES)
    a, b = Holder(), Holder()
    errors: list[BaseException] = []
    threads = [
        threading.Thread(target=churn, args=(alloc, me, other, 300_000, seed, errors))
        for seed, (me, other) in enumerate([(a, b), (b, a)])
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not any(t.is_alive() for t in threads)
    # Unlocked, a check-then-pop that loses the race raises IndexError and leaks what it popped.
    assert errors == []
    assert a.got_pages_held_by_the_other == b.got_pages_held_by_the_other == []
    assert alloc.num_in_use == 0 and alloc.num_free == NUM_PAGES
    assert sorted(alloc.allocate(NUM_PAGES)) == list(range(NUM_PAGES))  # none lost


def test_double_free_across_threads_is_still_refused() -> None:
    alloc = PageAllocator(4)
    pages = alloc.allocate(2)
    alloc.free(pages)
    errors: list[BaseException] = []

    def free_again() -> None:
        try:
            alloc.free(pages)
        except PageAccountingError as exc:
            errors.append(exc)

    thread = threading.Thread(target=free_again)
    thread.start()
    thread.join(10)
    assert len(errors) == 1
    assert alloc.num_in_use == 0 and alloc.num_free == 4
