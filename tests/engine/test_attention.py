"""Paged decode attention against a plain per-request softmax attention."""

from __future__ import annotations

import pytest
import torch

from engine.attention import AttentionMetadata, SeqChunk, paged_attention


def reference(q, keys, values):
    """q [H, D]; keys, values [S, Hkv, D] of one request: grouped-query softmax attention."""
    group = q.shape[0] // keys.shape[1]
    k = keys.repeat_interleave(group, dim=1).transpose(0, 1).float()  # [H, S, D]
    v = values.repeat_interleave(group, dim=1).transpose(0, 1).float()
    scores = (q.float()[:, None, :] @ k.transpose(1, 2)).squeeze(1) * q.shape[-1] ** -0.5
    return (torch.softmax(scores, dim=-1)[:, None, :] @ v).squeeze(1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_matches_reference_with_uneven_lengths(dtype):
    page_size, heads, kv_heads, dim = 4, 8, 2, 16
    gen = torch.Generator().manual_seed(0)
    k_cache = torch.randn(64 * page_size, kv_heads, dim, generator=gen).to(dtype)
    v_cache = torch.randn(64 * page_size, kv_heads, dim, generator=gen).to(dtype)
    # Scattered, out-of-order pages; lengths that end mid-page and on a page boundary.
    starts, page_lists, next_page = [3, 11, 8, 1], [], 0
    for start in starts:
        n = start // page_size + 1
        page_lists.append(list(range(next_page + n - 1, next_page - 1, -1)))
        next_page += n + 3
    chunks = [SeqChunk(s, 1, p) for s, p in zip(starts, page_lists, strict=True)]
    meta = AttentionMetadata.build(chunks, page_size)
    assert meta.is_decode
    q = torch.randn(len(starts), heads, dim, generator=gen).to(dtype)
    k = torch.randn(len(starts), kv_heads, dim, generator=gen).to(dtype)
    v = torch.randn(len(starts), kv_heads, dim, generator=gen).to(dtype)

    out = paged_attention(q, k, v, k_cache, v_cache, meta)

    assert out.shape == q.shape and out.dtype == dtype
    for i, (start, pages) in enumerate(zip(starts, page_lists, strict=True)):
        slots = torch.tensor(
            [pages[p // page_size] * page_size + p % page_size for p in range(start + 1)]
        )
        torch.testing.assert_close(k_cache[slots[-1]], k[i])
        ref = reference(q[i], k_cache[slots], v_cache[slots])
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(out[i].float(), ref, rtol=tol, atol=tol)
