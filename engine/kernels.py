"""Triton kernels of the CUDA path: paged decode attention, rotary embedding fused with the KV
cache write, residual-add RMSNorm and SwiGLU's activation.

Why these four: on a GPU the matmuls go to cuBLAS and prefill attention to SDPA's flash kernel,
and what is left is either many small element-wise kernels (a decode step of a 28-layer model
would launch several hundred of them) or a gather of every request's KV pages per layer. Each
kernel here does in one pass what torch would do in three to five. Imported only for CUDA
tensors: Triton is not part of the CPU build of torch, and the CPU path does the same arithmetic
with torch ops (engine/layers.py, engine/attention.py).
"""

from __future__ import annotations

from functools import cache

import torch
import triton
import triton.language as tl

LOG2_E = 1.4426950408889634


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    res_out_ptr,
    n_cols,
    x_stride,
    res_stride,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * res_stride + cols, mask=mask, other=0.0).to(tl.float32)
        # Round the sum as the unfused `h + delta` would, and normalise what is stored.
        summed = (x + r).to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * n_cols + cols, summed, mask=mask)
        x = summed.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * n_cols + cols, (x * rstd * w).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(x + residual) * weight, x + residual); without a residual, (RMSNorm(x), x)."""
    rows, cols = x.shape
    out = torch.empty((rows, cols), dtype=x.dtype, device=x.device)
    res_out = torch.empty_like(out) if residual is not None else x
    if rows:
        _rms_norm_kernel[(rows,)](
            x,
            residual if residual is not None else x,
            weight,
            out,
            res_out,
            cols,
            x.stride(0),
            residual.stride(0) if residual is not None else 0,
            eps,
            HAS_RESIDUAL=residual is not None,
            BLOCK=triton.next_power_of_2(cols),
            num_warps=8 if cols >= 4096 else 4,
        )
    return out, res_out


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, n_cols, x_stride, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * x_stride + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * n_cols + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for the fused [T, 2 * I] gate/up projection."""
    rows, cols = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty((rows, cols), dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    if rows:
        _silu_mul_kernel[(rows, triton.cdiv(cols, block))](
            gate_up, out, cols, gate_up.stride(0), BLOCK=block
        )
    return out


@triton.jit
def _rotary_store_kernel(
    qkv_ptr,
    cos_ptr,
    sin_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    qkv_stride,
    cs_stride,
    NUM_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEADS_BLOCK: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * HEADS_BLOCK + tl.arange(0, HEADS_BLOCK)
    d = tl.arange(0, HEAD_DIM)
    rolled = (d + HEAD_DIM // 2) % HEAD_DIM
    is_rotated = heads < NUM_HEADS + NUM_KV_HEADS  # q and k heads; v heads pass through
    valid = heads < NUM_HEADS + 2 * NUM_KV_HEADS
    row = qkv_ptr + token * qkv_stride + heads[:, None] * HEAD_DIM
    x = tl.load(row + d[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
    x_rolled = tl.load(row + rolled[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
    cos = tl.load(cos_ptr + token * cs_stride + d).to(tl.float32)
    sin = tl.load(sin_ptr + token * cs_stride + d).to(tl.float32)  # first half negated
    y = tl.where(is_rotated[:, None], x * cos[None, :] + x_rolled * sin[None, :], x)
    y = y.to(qkv_ptr.dtype.element_ty)
    tl.store(row + d[None, :], y, mask=(valid & is_rotated)[:, None])
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot >= 0:  # padding rows of a captured decode batch carry slot -1
        k_head = heads - NUM_HEADS
        is_k = (k_head >= 0) & (k_head < NUM_KV_HEADS)
        k_off = (slot * NUM_KV_HEADS + k_head) * HEAD_DIM
        k_val = y.to(k_cache_ptr.dtype.element_ty)
        tl.store(k_cache_ptr + k_off[:, None] + d[None, :], k_val, mask=is_k[:, None])
        v_head = k_head - NUM_KV_HEADS
        is_v = (v_head >= 0) & valid
        v_off = (slot * NUM_KV_HEADS + v_head) * HEAD_DIM
        v_val = y.to(v_cache_ptr.dtype.element_ty)
        tl.store(v_cache_ptr + v_off[:, None] + d[None, :], v_val, mask=is_v[:, None])


def rotary_store(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
) -> None:
    """Rotates the q and k heads of the fused projection `qkv` [T, (H + 2 Hkv) * D] in place and
    writes k and v to their cache slots. cos, sin: [T, 1, D] from `RotaryEmbedding.cos_sin`;
    caches: [slots, Hkv, D]; a slot below 0 writes nothing."""
    tokens = qkv.shape[0]
    head_dim = k_cache.shape[-1]
    total = num_heads + 2 * num_kv_heads
    heads_block = min(8, triton.next_power_of_2(total))
    if tokens:
        _rotary_store_kernel[(tokens, triton.cdiv(total, heads_block))](
            qkv,
            cos,
            sin,
            k_cache,
            v_cache,
            slot_mapping,
            qkv.stride(0),
            cos.stride(0),
            NUM_HEADS=num_heads,
            NUM_KV_HEADS=num_kv_heads,
            HEAD_DIM=head_dim,
            HEADS_BLOCK=heads_block,
        )


@triton.jit
def _paged_decode_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    table_ptr,
    lens_ptr,
    out_ptr,
    part_ptr,
    lse_ptr,
    q_stride_t,
    q_stride_h,
    out_stride_t,
    out_stride_h,
    table_stride,
    scale,
    NUM_KV_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
):
    """One (request, KV head, split of the context): the group of query heads that share the
    KV head attend over the split's keys, read through the page table (no gather). One split
    writes the output; several leave partial results and log-sum-exps for `_merge_splits_kernel`
    (merging them here, in the last split to finish, measured slower: one program's serial
    loop over the splits is longer than a second launch)."""
    b = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(lens_ptr + b)
    per_split = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, seq_len)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + g
    in_group = g < GROUP
    q = tl.load(
        q_ptr + b * q_stride_t + heads[:, None] * q_stride_h + d[None, :],
        mask=in_group[:, None],
        other=0.0,
    )
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    denom = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        in_range = pos < end
        page = tl.load(table_ptr + b * table_stride + pos // PAGE_SIZE, mask=in_range, other=0)
        slot = page.to(tl.int64) * PAGE_SIZE + pos % PAGE_SIZE
        kv_off = (slot * NUM_KV_HEADS + kv_head) * HEAD_DIM
        k = tl.load(k_cache_ptr + kv_off[:, None] + d[None, :], mask=in_range[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k).to(q.dtype)) * scale  # log2 units: exp2 below
        s = tl.where(in_range[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        denom = denom * alpha + tl.sum(p, axis=1)
        v = tl.load(v_cache_ptr + kv_off[:, None] + d[None, :], mask=in_range[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    has_keys = denom > 0.0  # an empty split (short context, padding row) contributes nothing
    out = acc / tl.where(has_keys, denom, 1.0)[:, None]
    out_rows = out_ptr + b * out_stride_t + heads[:, None] * out_stride_h + d[None, :]
    if NUM_SPLITS == 1:
        tl.store(out_rows, out.to(out_ptr.dtype.element_ty), mask=in_group[:, None])
    else:
        lse = tl.where(has_keys, m + tl.log2(tl.where(has_keys, denom, 1.0)), float("-inf"))
        first_row = (b * NUM_KV_HEADS * GROUP + heads) * NUM_SPLITS
        tl.store(
            part_ptr + (first_row + split)[:, None] * HEAD_DIM + d[None, :],
            out,
            mask=in_group[:, None],
        )
        tl.store(lse_ptr + first_row + split, lse, mask=in_group)


@triton.jit
def _merge_splits_kernel(
    part_ptr,
    lse_ptr,
    out_ptr,
    out_stride_t,
    out_stride_h,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    sp = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, HEAD_DIM)
    row = (b * NUM_HEADS + head) * NUM_SPLITS + sp
    in_splits = sp < NUM_SPLITS
    lse = tl.load(lse_ptr + row, mask=in_splits, other=float("-inf"))
    weight = tl.exp2(lse - tl.max(lse, axis=0))
    weight = tl.where(in_splits & (lse > float("-inf")), weight, 0.0)
    parts = tl.load(
        part_ptr + row[:, None] * HEAD_DIM + d[None, :], mask=in_splits[:, None], other=0.0
    )
    total = tl.sum(weight, axis=0)
    out = tl.sum(parts * weight[:, None], axis=0) / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + b * out_stride_t + head * out_stride_h + d, out.to(out_ptr.dtype.element_ty))


def decode_splits(batch: int, num_kv_heads: int, device: torch.device) -> int:
    """How many pieces each request's context is cut into: enough (request, KV head, split)
    programs to fill the GPU about twice; fixed per batch size so a captured graph stays valid
    as contexts grow (splits beyond a short context exit at once)."""
    return max(1, min(32, triton.cdiv(2 * _num_sms(device), batch * num_kv_heads)))


@cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    page_size: int,
    num_splits: int | None = None,
    block_n: int = 64,
) -> torch.Tensor:
    """One query row per request ([B, H, D]) against its first `seq_lens[b]` cached tokens,
    found through `block_tables` [B, >= pages] (page ids). Caches: [slots, Hkv, D]. Flash
    decoding: the context is split over programs and the pieces merged by their log-sum-exp."""
    batch, heads, dim = q.shape
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    splits = num_splits or decode_splits(batch, kv_heads, q.device)
    out = torch.empty((batch, heads, dim), dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    part = lse = out  # unused with one split
    if splits > 1:
        part = torch.empty((batch, heads, splits, dim), dtype=torch.float32, device=q.device)
        lse = torch.empty((batch, heads, splits), dtype=torch.float32, device=q.device)
    _paged_decode_kernel[(batch, kv_heads, splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        out,
        part,
        lse,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        block_tables.stride(0),
        dim**-0.5 * LOG2_E,
        NUM_KV_HEADS=kv_heads,
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=dim,
        PAGE_SIZE=page_size,
        BLOCK_N=block_n,
        NUM_SPLITS=splits,
        num_warps=4,
        num_stages=2,
    )
    if splits > 1:
        _merge_splits_kernel[(batch, heads)](
            part,
            lse,
            out,
            out.stride(0),
            out.stride(1),
            NUM_HEADS=heads,
            HEAD_DIM=dim,
            NUM_SPLITS=splits,
            SPLITS_PAD=triton.next_power_of_2(splits),
        )
    return out
