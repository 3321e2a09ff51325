"""Triton kernels for the uniform block records (key min/max), each next to its torch reference.

Two ops write one layer's record buffers in place:
- `build_summaries`: after prefill, the min/max of every newly closed block's keys;
- `update_open_summaries`: at decode, fold the one new key of each request into its open block.

Shapes (one layer; the record buffers are `BlockTable.kmin[layer]` / `kmax[layer]`):
    keys:       [num_slots, KvH, D]   the KV pool's key buffer, any float dtype
    kmin, kmax: [capacity, KvH, D]    record buffers, same strides, any float dtype
Math is done in fp32 after the load; min/max of exactly representable values is exact, so the
Triton and torch versions agree bit for bit (NaN keys are not supported: the two min/max
functions may treat them differently).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dynsplit_sglang.kernels.block_summary import block_min_max

# Slots of one block visited per loop step. Blocks are a few dozen to a few hundred tokens long,
# so a block is read in a handful of steps; wider tiles would mostly be masked out.
BLOCK_P = 32


def _check_records(keys: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> None:
    assert keys.dim() == 3 and kmin.dim() == 3, "keys [num_slots, KvH, D], kmin/kmax [capacity, KvH, D]"
    assert kmin.shape == kmax.shape and kmin.shape[1:] == keys.shape[1:], (keys.shape, kmin.shape, kmax.shape)
    # The kernels address both record buffers with one set of strides.
    assert kmin.stride() == kmax.stride(), (kmin.stride(), kmax.stride())


# --- build: min/max of whole blocks ----------------------------------------------------------


@triton.jit
def _build_summaries_kernel(
    keys_ptr,  # [num_slots, KvH, D]
    slots_ptr,  # [nb, P] int64
    lengths_ptr,  # [nb]
    records_ptr,  # [nb] int64
    kmin_ptr,  # [capacity, KvH, D]
    kmax_ptr,  # [capacity, KvH, D]
    stride_ks,
    stride_kh,
    stride_kd,
    stride_sb,
    stride_sp,
    stride_rc,
    stride_rh,
    stride_rd,
    head_dim,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program per (block, KV head): it walks the block's slots BLOCK_P at a time and keeps a
    # running [D] min and max, so any block length works with a fixed register footprint.
    b = tl.program_id(0)
    h = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    length = tl.load(lengths_ptr + b)
    lo = tl.full([BLOCK_D], float("inf"), tl.float32)
    hi = tl.full([BLOCK_D], float("-inf"), tl.float32)
    for p0 in range(0, length, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        p_ok = p < length  # padding slots past the block's length are never read
        slot = tl.load(slots_ptr + b * stride_sb + p * stride_sp, mask=p_ok, other=0)
        ok = p_ok[:, None] & d_ok[None, :]
        ptrs = keys_ptr + slot[:, None] * stride_ks + h * stride_kh + d[None, :] * stride_kd
        k = tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)
        lo = tl.minimum(lo, tl.min(tl.where(ok, k, float("inf")), axis=0))
        hi = tl.maximum(hi, tl.max(tl.where(ok, k, float("-inf")), axis=0))
    rec = tl.load(records_ptr + b)
    out = rec * stride_rc + h * stride_rh + d * stride_rd
    tl.store(kmin_ptr + out, lo.to(kmin_ptr.dtype.element_ty), mask=d_ok)
    tl.store(kmax_ptr + out, hi.to(kmax_ptr.dtype.element_ty), mask=d_ok)


def build_summaries(
    keys: torch.Tensor,
    slots: torch.Tensor,
    lengths: torch.Tensor,
    records: torch.Tensor,
    kmin: torch.Tensor,
    kmax: torch.Tensor,
) -> None:
    """Write the key min/max of each new block into its record, in place (Triton).

    keys:       [num_slots, KvH, D] one layer's key buffer.
    slots:      [nb, P] int64 KV slots of each block, padded to any P >= max length (padding is
                never read).
    lengths:    [nb] int32/int64 real length of each block (>= 1; 0 writes +inf / -inf).
    records:    [nb] int64 distinct record ids, rows of kmin/kmax.
    kmin, kmax: [capacity, KvH, D] this layer's record buffers; rows `records` are overwritten.
    """
    _check_records(keys, kmin, kmax)
    nb = slots.shape[0]
    if nb == 0:
        return
    num_kv_heads, head_dim = keys.shape[1], keys.shape[2]
    _build_summaries_kernel[(nb, num_kv_heads)](
        keys,
        slots,
        lengths,
        records,
        kmin,
        kmax,
        keys.stride(0),
        keys.stride(1),
        keys.stride(2),
        slots.stride(0),
        slots.stride(1),
        kmin.stride(0),
        kmin.stride(1),
        kmin.stride(2),
        head_dim,
        BLOCK_P=BLOCK_P,
        BLOCK_D=triton.next_power_of_2(head_dim),
    )


def build_summaries_reference(
    keys: torch.Tensor,
    slots: torch.Tensor,
    lengths: torch.Tensor,
    records: torch.Tensor,
    kmin: torch.Tensor,
    kmax: torch.Tensor,
) -> None:
    """Torch reference of `build_summaries` (same arguments, same in-place effect)."""
    _check_records(keys, kmin, kmax)
    if slots.shape[0] == 0:
        return
    # Padding may hold anything (e.g. -1); point it at slot 0 so the gather stays in bounds.
    valid = torch.arange(slots.shape[1], device=slots.device)[None, :] < lengths[:, None]
    lo, hi = block_min_max(keys, torch.where(valid, slots, 0), lengths)
    kmin[records] = lo.to(kmin.dtype)
    kmax[records] = hi.to(kmax.dtype)


# --- decode: fold one new key into each open block --------------------------------------------


@triton.jit
def _update_open_summaries_kernel(
    keys_ptr,  # [num_slots, KvH, D]
    new_slots_ptr,  # [B] int64
    records_ptr,  # [B] int64, < 0: skip
    reset_ptr,  # [B] bool
    kmin_ptr,  # [capacity, KvH, D]
    kmax_ptr,  # [capacity, KvH, D]
    stride_ks,
    stride_kh,
    stride_kd,
    stride_rc,
    stride_rh,
    stride_rd,
    num_kv_heads,
    head_dim,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program per request, all KV heads at once as a [KvH, D] tile: the work per request is a
    # single key row, so a finer grid would only add launch overhead.
    r = tl.program_id(0)
    rec = tl.load(records_ptr + r)
    slot = tl.load(new_slots_ptr + r)
    reset = tl.load(reset_ptr + r) != 0
    # A negative record marks a padded batch row (CUDA-graph batch sizes): mask it out instead
    # of branching on the host, so one captured graph serves any real batch size.
    live = rec >= 0
    rec = tl.where(live, rec, 0)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    ok = (h[:, None] < num_kv_heads) & (d[None, :] < head_dim) & live
    key = tl.load(keys_ptr + slot * stride_ks + h[:, None] * stride_kh + d[None, :] * stride_kd, mask=ok, other=0.0)
    key = key.to(tl.float32)
    out = rec * stride_rc + h[:, None] * stride_rh + d[None, :] * stride_rd
    old_min = tl.load(kmin_ptr + out, mask=ok, other=0.0).to(tl.float32)
    old_max = tl.load(kmax_ptr + out, mask=ok, other=0.0).to(tl.float32)
    # A token that opens a new block replaces whatever the (recycled) record held before.
    new_min = tl.where(reset, key, tl.minimum(old_min, key))
    new_max = tl.where(reset, key, tl.maximum(old_max, key))
    tl.store(kmin_ptr + out, new_min.to(kmin_ptr.dtype.element_ty), mask=ok)
    tl.store(kmax_ptr + out, new_max.to(kmax_ptr.dtype.element_ty), mask=ok)


def update_open_summaries(
    keys: torch.Tensor,
    new_slots: torch.Tensor,
    records: torch.Tensor,
    kmin: torch.Tensor,
    kmax: torch.Tensor,
    reset: torch.Tensor,
) -> None:
    """Fold each request's newest key into its open block's record, in place (Triton).

    keys:       [num_slots, KvH, D] one layer's key buffer (the new keys are already written).
    new_slots:  [B] int64 KV slot of each request's new token.
    records:    [B] int64 record of each request's open block; distinct, or < 0 to skip the row
                (padding of a CUDA-graph batch).
    kmin, kmax: [capacity, KvH, D] this layer's record buffers, updated in place.
    reset:      [B] bool, the token starts a new block: the record becomes exactly its key.

    No host sync and no data-dependent shapes, so it can be captured in a CUDA graph.
    """
    _check_records(keys, kmin, kmax)
    batch = new_slots.shape[0]
    if batch == 0:
        return
    num_kv_heads, head_dim = keys.shape[1], keys.shape[2]
    _update_open_summaries_kernel[(batch,)](
        keys,
        new_slots,
        records,
        reset,
        kmin,
        kmax,
        keys.stride(0),
        keys.stride(1),
        keys.stride(2),
        kmin.stride(0),
        kmin.stride(1),
        kmin.stride(2),
        num_kv_heads,
        head_dim,
        BLOCK_H=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim),
    )


def update_open_summaries_reference(
    keys: torch.Tensor,
    new_slots: torch.Tensor,
    records: torch.Tensor,
    kmin: torch.Tensor,
    kmax: torch.Tensor,
    reset: torch.Tensor,
) -> None:
    """Torch reference of `update_open_summaries` (same arguments, same in-place effect)."""
    _check_records(keys, kmin, kmax)
    live = records >= 0
    recs, key = records[live], keys[new_slots[live]].float()  # [b], [b, KvH, D]
    fresh = reset[live][:, None, None]
    kmin[recs] = torch.where(fresh, key, torch.minimum(kmin[recs].float(), key)).to(kmin.dtype)
    kmax[recs] = torch.where(fresh, key, torch.maximum(kmax[recs].float(), key)).to(kmax.dtype)
