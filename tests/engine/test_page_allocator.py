"""The page allocator keeps a request's pages in as few runs as it can: the transport writes one
Mooncake segment per run per layer per K/V, so scattered pages mean thousands of segments."""

from __future__ import annotations

import collections

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import PageAccountingError, PageAllocator, PageTable
from engine.errors import OutOfPagesError


def runs(pages: list[int]) -> list[tuple[int, int]]:
    """(start, length) of each stretch of consecutive indices, in list order."""
    out: list[tuple[int, int]] = []
    for page in pages:
        if out and page == out[-1][0] + out[-1][1]:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((page, 1))
    return out


def held_in_blocks(alloc: PageAllocator, size: int) -> list[list[int]]:
    """Every page of a fresh allocator, held as consecutive blocks of `size`."""
    return [alloc.allocate(size) for _ in range(alloc.num_pages // size)]


def test_a_fresh_allocator_hands_out_pages_from_zero_in_order():
    alloc = PageAllocator(16)
    assert alloc.allocate(3) == [0, 1, 2]
    assert alloc.allocate(1) == [3]
    assert alloc.num_free == 12 and alloc.num_in_use == 4


def test_a_long_prompt_after_churn_gets_one_run_when_a_stretch_is_free():
    alloc = PageAllocator(64)
    blocks = held_in_blocks(alloc, 4)
    for b in (1, 3, 7, 6, 8):  # free runs: [4, 8), [12, 16), [24, 36)
        alloc.free(blocks[b])
    # A FIFO of freed pages would give [4..7, 12..15, 24..27]: three runs.
    assert alloc.allocate(12) == list(range(24, 36))


def test_the_lowest_free_run_that_holds_the_request_is_used_first():
    alloc = PageAllocator(64)
    blocks = held_in_blocks(alloc, 4)
    for b in (9, 10, 2, 3, 4, 12):  # free runs: [8, 20), [36, 44), [48, 52)
        alloc.free(blocks[b])
    assert alloc.allocate(6) == list(range(8, 14))
    assert alloc.allocate(8) == list(range(36, 44))  # [14, 20) is too short now


def test_a_single_page_takes_the_lowest_free_page():
    alloc = PageAllocator(32)
    blocks = held_in_blocks(alloc, 4)
    alloc.free(blocks[5])
    alloc.free([blocks[2][3]])
    alloc.free(blocks[1])  # free: [4, 8), 11, [20, 24)
    assert [alloc.allocate(1) for _ in range(6)] == [[4], [5], [6], [7], [11], [20]]


def test_decode_growth_page_by_page_on_an_idle_cache_stays_one_run():
    alloc = PageAllocator(64)
    table = PageTable(page_size=16)
    for tokens in range(1, 40 * 16):
        table.grow_to(tokens, alloc)
    assert runs(table.pages) == [(0, 40)]


def test_freed_neighbours_merge_into_one_run_whatever_the_order():
    alloc = PageAllocator(12)
    a, b, c = alloc.allocate(4), alloc.allocate(4), alloc.allocate(4)
    alloc.free(b)
    alloc.free(c[::-1])
    alloc.free([a[2], a[0]])
    alloc.free([a[3], a[1]])
    assert alloc.allocate(12) == list(range(12))


def test_when_no_stretch_is_long_enough_the_fewest_runs_are_used_in_ascending_order():
    alloc = PageAllocator(32)
    blocks = held_in_blocks(alloc, 2)
    for b in (1, 4, 5, 9, 10, 11):  # free runs: [2, 4), [8, 12), [18, 24)
        alloc.free(blocks[b])
    pages = alloc.allocate(9)
    assert runs(pages) == [(8, 3), (18, 6)]  # the two largest runs; never the three of them
    assert alloc.num_free == 3 and alloc.allocate(3) == [2, 3, 11]


def test_double_free_raises_and_changes_nothing():
    alloc = PageAllocator(8)
    pages = alloc.allocate(4)
    alloc.free(pages[:2])
    with pytest.raises(PageAccountingError, match=r"\[0, 1\]"):
        alloc.free(pages)  # 0 and 1 are free already; 2 and 3 must stay in use
    assert alloc.num_free == 6 and alloc.num_in_use == 2
    alloc.free(pages[2:])
    assert alloc.num_free == 8


def test_freeing_a_page_twice_in_one_call_raises():
    alloc = PageAllocator(8)
    alloc.allocate(4)
    with pytest.raises(PageAccountingError, match=r"\[2\]"):
        alloc.free([1, 2, 2])
    assert alloc.num_in_use == 4


@pytest.mark.parametrize("page", [-1, 8, 100])
def test_freeing_a_page_outside_the_cache_raises(page: int):
    alloc = PageAllocator(8)
    alloc.allocate(8)
    with pytest.raises(PageAccountingError):
        alloc.free([page])
    assert alloc.num_in_use == 8


def test_freeing_a_page_never_handed_out_raises():
    alloc = PageAllocator(8)
    alloc.allocate(3)
    with pytest.raises(PageAccountingError, match=r"\[3\]"):
        alloc.free([2, 3])
    assert alloc.num_in_use == 3


def test_over_allocation_raises_and_holds_nothing_new():
    alloc = PageAllocator(8)
    held = alloc.allocate(5)
    alloc.free(held[1:3])  # fragmented: 5 free in two runs
    with pytest.raises(OutOfPagesError):
        alloc.allocate(6)
    assert alloc.num_free == 5 and alloc.can_allocate(5) and not alloc.can_allocate(6)
    assert sorted(alloc.allocate(5)) == [1, 2, 5, 6, 7]


def test_zero_pages_are_nothing_and_a_negative_count_is_refused():
    alloc = PageAllocator(4)
    assert alloc.allocate(0) == []
    with pytest.raises(ValueError):
        alloc.allocate(-1)
    assert alloc.num_free == 4


def test_a_large_fragmented_cache_keeps_exact_accounting():
    alloc = PageAllocator(100_000)
    pages = alloc.allocate(100_000)
    alloc.free(pages[::2])  # 50,000 free runs of one page
    assert alloc.num_free == 50_000
    assert runs(alloc.allocate(3)) == [(0, 1), (2, 1), (4, 1)]
    alloc.free(pages[1:1000:2])  # 1, 3 and [5, 1001): 0, 2 and 4 are held again
    assert alloc.allocate(900) == list(range(5, 905))


# -- properties ------------------------------------------------------------------------------

NUM_PAGES = 96
op = st.tuples(
    st.sampled_from(["allocate", "free", "free_every_other"]),
    st.integers(1, 24),  # pages to allocate
    st.integers(0, 1_000),  # which held request to free
)


@settings(max_examples=300, deadline=None)
@given(st.lists(op, max_size=60), st.integers(1, NUM_PAGES))
def test_after_any_churn_a_request_gets_the_fewest_runs_and_accounting_is_exact(ops, want):
    alloc = PageAllocator(NUM_PAGES)
    held: list[list[int]] = []
    for kind, count, who in ops:
        if kind == "allocate":
            if count > alloc.num_free:
                with pytest.raises(OutOfPagesError):
                    alloc.allocate(count)
                continue
            pages = alloc.allocate(count)
            assert pages == sorted(pages) and len(pages) == count
            assert not set(pages) & {p for h in held for p in h}, "a page handed out twice"
            held.append(pages)
        elif held:
            pages = held.pop(who % len(held))
            if kind == "free_every_other":  # a request may give back part of what it holds
                held.append(pages[1::2])
                pages = pages[::2]
            alloc.free(pages)
        in_use = [p for h in held for p in h]
        assert len(in_use) == len(set(in_use)) == alloc.num_in_use
        assert alloc.num_free + alloc.num_in_use == NUM_PAGES

    free_runs = runs(sorted(set(range(NUM_PAGES)) - {p for h in held for p in h}))
    want = min(want, alloc.num_free)
    if want == 0:
        return
    pages = alloc.allocate(want)
    assert len(pages) == len(set(pages)) == want and pages == sorted(pages)
    assert not set(pages) & {p for h in held for p in h}
    fits = [start for start, length in free_runs if length >= want]
    if fits:  # first fit: the lowest stretch that holds it whole
        assert pages == list(range(fits[0], fits[0] + want))
    else:  # as few runs as the largest free runs need
        longest_first = sorted((length for _, length in free_runs), reverse=True)
        fewest = next(k for k in range(1, len(free_runs) + 1) if sum(longest_first[:k]) >= want)
        assert len(runs(pages)) == fewest
    assert alloc.num_in_use == len({p for h in held for p in h}) + want
    alloc.free(pages)
    for h in held:
        alloc.free(h)
    assert alloc.num_free == NUM_PAGES and alloc.allocate(NUM_PAGES) == list(range(NUM_PAGES))


# -- shared pages: the n choices of one prompt hold its full pages together -------------------


def test_a_shared_page_is_free_only_after_its_last_holder_frees_it():
    alloc = PageAllocator(8)
    prompt = alloc.allocate(3)
    alloc.share(prompt, holders=2)  # three choices hold the prompt's pages
    assert [alloc.holders(p) for p in prompt] == [3, 3, 3]
    alloc.free(prompt)
    alloc.free(prompt)
    assert alloc.num_in_use == 3 and alloc.holders(prompt[0]) == 1
    assert alloc.allocate(5) == [3, 4, 5, 6, 7]  # the shared pages are not handed out again
    alloc.free(prompt)
    assert alloc.holders(prompt[0]) == 0 and alloc.num_free == 3
    assert alloc.allocate(3) == prompt


def test_one_call_may_free_a_shared_page_once_per_holder_and_no_more():
    alloc = PageAllocator(4)
    pages = alloc.allocate(2)
    alloc.share(pages[:1])
    with pytest.raises(PageAccountingError):
        alloc.free([pages[0]] * 3)  # two holders
    assert alloc.holders(pages[0]) == 2 and alloc.num_in_use == 2  # nothing changed
    alloc.free([pages[0], pages[0], pages[1]])
    assert alloc.num_free == 4


def test_only_pages_in_use_can_be_shared():
    alloc = PageAllocator(4)
    held = alloc.allocate(1)
    with pytest.raises(PageAccountingError):
        alloc.share([*held, 2])
    assert alloc.holders(held[0]) == 1  # the refused call shared nothing


share_op = st.tuples(
    st.sampled_from(["allocate", "share", "free"]), st.integers(1, 9), st.integers(0, 99)
)


@settings(max_examples=300, deadline=None)
@given(st.lists(share_op, max_size=60))
def test_after_any_sharing_a_page_is_free_exactly_when_no_holder_is_left(ops):
    alloc = PageAllocator(NUM_PAGES)
    held: list[list[int]] = []  # each holder's pages; a page may be in several
    for kind, count, who in ops:
        if kind == "allocate" and count <= alloc.num_free:
            held.append(alloc.allocate(count))
        elif kind == "share" and held:
            pages = held[who % len(held)][:count]
            alloc.share(pages)
            held.append(list(pages))
        elif kind == "free" and held:
            alloc.free(held.pop(who % len(held)))
        holders = collections.Counter(p for h in held for p in h)
        assert alloc.num_in_use == len(holders)
        assert all(alloc.holders(p) == holders[p] for p in range(NUM_PAGES))
    for h in held:
        alloc.free(h)
    assert alloc.num_free == NUM_PAGES and alloc.allocate(NUM_PAGES) == list(range(NUM_PAGES))
