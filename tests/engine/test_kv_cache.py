"""The paged KV cache: exact page accounting and the byte addresses the transport will use."""

from __future__ import annotations

import contextlib
import ctypes

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import KVCacheSpec, PageAccountingError, PageAllocator, PagedKVCache, PageTable
from engine.errors import OutOfPagesError


def test_layer_tensors_have_the_vllm_layout():
    spec = KVCacheSpec(num_pages=10, page_size=4, num_kv_heads=2, head_dim=8, dtype=torch.float16)
    cache = PagedKVCache(spec, first_layer=3, num_layers=2)
    assert [t.shape for t in cache.layers] == [(2, 10, 4, 2, 8)] * 2
    assert [r.layer for r in cache.regions()] == [3, 4]
    assert cache.nbytes == 2 * 2 * 10 * 4 * 2 * 8 * 2


def test_region_addresses_point_at_the_right_bytes():
    spec = KVCacheSpec(num_pages=6, page_size=4, num_kv_heads=2, head_dim=8, dtype=torch.float32)
    cache = PagedKVCache(spec, first_layer=0, num_layers=2)
    for t in cache.layers:
        t.copy_(torch.randn_like(t))
    for region, t in zip(cache.regions(), cache.layers, strict=True):
        assert region.nbytes == t.numel() * 4
        for kv in (0, 1):
            for page in (0, 3, 5):
                for token in (0, 2):
                    addr = (
                        region.base_address
                        + kv * region.kv_stride
                        + page * region.page_stride
                        + token * region.token_stride
                    )
                    raw = ctypes.string_at(addr, 2 * 8 * 4)
                    got = torch.frombuffer(bytearray(raw), dtype=torch.float32).view(2, 8)
                    torch.testing.assert_close(got, t[kv, page, token])
        # One page of K is contiguous: page_nbytes bytes from its start hold exactly that page.
        raw = ctypes.string_at(region.base_address + 2 * region.page_stride, region.page_nbytes)
        page = torch.frombuffer(bytearray(raw), dtype=torch.float32).view(4, 2, 8)
        torch.testing.assert_close(page, t[0, 2])


def test_allocator_refuses_double_free_and_foreign_pages():
    alloc = PageAllocator(4)
    pages = alloc.allocate(2)
    alloc.free(pages)
    with pytest.raises(PageAccountingError):
        alloc.free(pages)
    with pytest.raises(PageAccountingError):
        alloc.free([3])
    with pytest.raises(OutOfPagesError):
        alloc.allocate(5)
    assert alloc.num_in_use == 0 and alloc.num_free == 4


def test_page_table_release_is_idempotent():
    alloc = PageAllocator(8)
    table = PageTable(page_size=4)
    table.grow_to(9, alloc)
    assert len(table.pages) == 3 and alloc.num_in_use == 3
    table.release(alloc)
    table.release(alloc)
    assert alloc.num_in_use == 0


def test_a_failed_grow_holds_nothing_new():
    alloc = PageAllocator(3)
    table = PageTable(page_size=2)
    table.grow_to(4, alloc)
    with pytest.raises(OutOfPagesError):
        table.grow_to(20, alloc)
    assert table.pages and len(table.pages) == 2 and alloc.num_in_use == 2


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(["grow", "release"]), st.integers(0, 7), st.integers(0, 40)))
)
def test_allocator_accounting_is_exact_under_any_sequence_of_operations(ops):
    alloc = PageAllocator(16)
    tables = [PageTable(page_size=4) for _ in range(8)]
    for op, who, tokens in ops:
        table = tables[who]
        if op == "grow":
            with contextlib.suppress(OutOfPagesError):
                table.grow_to(tokens, alloc)
            assert table.capacity >= tokens or alloc.num_free < table.pages_to_grow(tokens)
        else:
            table.release(alloc)
        held = [p for t in tables for p in t.pages]
        assert len(held) == len(set(held)) == alloc.num_in_use
        assert alloc.num_in_use + alloc.num_free == 16
    for t in tables:
        t.release(alloc)
    assert alloc.num_in_use == 0
