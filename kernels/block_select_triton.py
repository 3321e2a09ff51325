"""Batched decode-time block selection (Triton), next to a batched torch reference.

`select_slots` does for a whole decode batch and one layer what `block_select.score_blocks` +
`block_select.select_positions` do for one request, and maps the kept positions to KV slots:

    for each request b and KV head h:
        keep positions [0, keep_head) and [keep_tail_from, seq_len),
        plus closed blocks in descending Quest score (ties: lower block first) while the
        cumulative cost (a block's positions outside the always-kept ranges) stays <= room,
        room = budget - kept head - kept tail, and the first costed positions of the next block
        up to the room left (so count = min(budget, seq_len) unless head + tail exceed budget);
        out[b, h, :count] = req_slots[b, kept positions in ascending order], 0 after count.

Shapes (B requests, H query heads, KvH KV heads, D head dim, NB closed-block columns):
    q:              [B, H, D]        decode queries, any float dtype (math in fp32)
    kmin, kmax:     [capacity, KvH, D] one layer's block key bounds (`BlockTable.kmin[layer]`)
    records:        [B, NB] int64    record id of each closed block in position order, -1 after
                                     the last one (a padded batch row is all -1)
    rec_start, rec_end: [capacity] int64 first / last position of each record's block
    req_slots:      [B, max_len] int64 KV slot of each position (SGLang's req_to_token rows)
    seq_lens, keep_head, keep_tail_from, budgets: [B] int64
    slots_out:      [B, KvH, MAXB] int64 written: kept slots, then 0 (SGLang's padding slot)
    counts_out:     [B, KvH] int32 or int64 written: number of kept positions

A request's closed blocks must be non-empty, ascending and non-overlapping and end before
seq_len; 0 <= keep_tail_from <= seq_len (what the splitter and `DynSplitPolicy.select` give).
MAXB is a fixed per-request width so one attention plan serves every layer: size it to the
largest budget. When a request's head + tail alone exceed MAXB, counts_out holds the true count
and only the first MAXB slots are written (callers keep budget >= head + tail to avoid that).

The GPU path is three launches with no host sync and no data-dependent shape (NB, MAXB and
max_len come from tensor shapes), so it can be captured in a CUDA graph:
    1. `_block_scores_kernel`   scores [B, KvH, NB] fp32
    2. `_choose_blocks_kernel`  per (request, KV head): sort, budget prefix, chosen blocks ->
                                per-block output offsets, and counts_out
    3. `_expand_kernel`         per output tile: output index -> position -> slot
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dynsplit_sglang.kernels.block_select import score_blocks, select_positions_batched

# Blocks scored per program of kernel 1. A [BLOCK_N, D] tile of kmin and of kmax is live at once;
# 32 x 128 fp32 x 2 stays in registers with 4 warps.
BLOCK_N = 32
# Output slots per program of kernel 3. Each program runs a binary search of log2(NB) dependent
# gathers, so wider tiles amortise that latency over more outputs.
BLOCK_O = 128
# Sort keys (int64) of kernel 2: the high 32 bits hold the score, the low bits the block index.
# Padding blocks get the smallest key, so a descending sort puts them last.
_KEY_NONE = tl.constexpr(-(2**63))
_KEY_MAX = tl.constexpr(2**63 - 1)


def _choose_warps(nb_p2: int) -> int:
    # Kernel 2 holds ~10 [NB_P2] int64 vectors per program (keys, sorted keys, costs, ...); 8
    # elements per thread keeps them in registers (ptxas in the compile test: no spills at 4096).
    return max(4, min(16, nb_p2 // 256))


# --- 1. block scores -----------------------------------------------------------------------------


@triton.jit
def _block_scores_kernel(
    q_ptr,  # [B, H, D]
    kmin_ptr,  # [capacity, KvH, D]
    kmax_ptr,  # [capacity, KvH, D]
    records_ptr,  # [B, NB] int64, -1 = none
    scores_ptr,  # [B, KvH, NB] fp32 contiguous
    stride_qb,
    stride_qh,
    stride_qd,
    stride_kc,
    stride_kh,
    stride_kd,
    stride_rb,
    stride_rn,
    num_kv_heads,
    num_blocks,
    group,
    head_dim,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program per (request, KV head, tile of BLOCK_N blocks).
    b = tl.program_id(0)
    h = tl.program_id(1)
    t = tl.program_id(2)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    q_ok = (g[:, None] < group) & d_ok[None, :]
    q_off = b * stride_qb + (h * group + g)[:, None] * stride_qh + d[None, :] * stride_qd  # [BLOCK_G, BLOCK_D]
    q = tl.load(q_ptr + q_off, mask=q_ok, other=0.0).to(tl.float32)
    # sum_g max(q_gd*kmin_d, q_gd*kmax_d) = kmax_d * sum_g max(q_gd, 0) + kmin_d * sum_g min(q_gd, 0):
    # the bound of the whole query group is linear in the two folded query vectors, so each block
    # costs 2*D multiply-adds however large the group is.
    q_pos = tl.sum(tl.maximum(q, 0.0), axis=0)  # [BLOCK_D]
    q_neg = tl.sum(tl.minimum(q, 0.0), axis=0)
    n = t * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < num_blocks
    rec = tl.load(records_ptr + b * stride_rb + n * stride_rn, mask=n_ok, other=-1)
    live = rec >= 0
    ok = live[:, None] & d_ok[None, :]
    off = tl.where(live, rec, 0)[:, None] * stride_kc + h * stride_kh + d[None, :] * stride_kd
    lo = tl.load(kmin_ptr + off, mask=ok, other=0.0).to(tl.float32)
    hi = tl.load(kmax_ptr + off, mask=ok, other=0.0).to(tl.float32)
    score = tl.sum(hi * q_pos[None, :] + lo * q_neg[None, :], axis=1)  # [BLOCK_N]
    tl.store(scores_ptr + (b * num_kv_heads + h) * num_blocks + n, score, mask=n_ok)


# --- 2. choose blocks ------------------------------------------------------------------------------


@triton.jit
def _block_cost(start, end, head_n, tail_from):
    # Positions of [start, end] outside the always-kept [0, head_n) and [tail_from, seq_len).
    return tl.maximum(tl.minimum(end, tail_from - 1) - tl.maximum(start, head_n) + 1, 0)


@triton.jit
def _sort_keys(scores_ptr, records_ptr, b, row, i, stride_rb, stride_rn, num_blocks, NB_P2: tl.constexpr):
    # tl.sort returns values only, so the block index rides in the low bits of an int64 key.
    # fp32 -> int32 that orders like the float: flip the magnitude bits of negatives. -0.0 is
    # made +0.0 first because torch's argsort treats them as equal (a tie, lower block first).
    live = tl.load(records_ptr + b * stride_rb + i * stride_rn, mask=i < num_blocks, other=-1) >= 0
    score = tl.load(scores_ptr + row + i, mask=live, other=0.0)
    score = tl.where(score == 0.0, 0.0, score)
    bits = score.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    # Low part NB_P2 - i in [1, NB_P2]: among equal scores the lower block has the larger key.
    key = ordered.to(tl.int64) * 4294967296 + (NB_P2 - i)
    return tl.where(live, key, _KEY_NONE)


@triton.jit
def _choose_blocks_kernel(
    scores_ptr,  # [B, KvH, NB] fp32 contiguous
    records_ptr,  # [B, NB] int64
    rec_start_ptr,  # [capacity] int64
    rec_end_ptr,  # [capacity] int64
    seq_lens_ptr,
    keep_head_ptr,
    keep_tail_from_ptr,
    budgets_ptr,  # [B]
    incl_ptr,  # [B, KvH, NB] int64 out: inclusive prefix of chosen costs, block order
    shift_ptr,  # [B, KvH, NB] int64 out: position - middle output index inside each block
    counts_ptr,  # [B, KvH] out
    stride_rb,
    stride_rn,
    stride_cb,
    stride_ch,
    num_kv_heads,
    num_blocks,
    NB_P2: tl.constexpr,
):
    # One program per (request, KV head); all NB blocks of the request live in one [NB_P2] vector.
    b = tl.program_id(0)
    h = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + b).to(tl.int64)
    tail_from = tl.load(keep_tail_from_ptr + b).to(tl.int64)
    head_n = tl.minimum(tl.load(keep_head_ptr + b).to(tl.int64), tail_from)
    room = tl.load(budgets_ptr + b).to(tl.int64) - head_n - (seq_len - tail_from)

    i = tl.arange(0, NB_P2)
    row = (b * num_kv_heads + h) * num_blocks
    skey = tl.sort(
        _sort_keys(scores_ptr, records_ptr, b, row, i, stride_rb, stride_rn, num_blocks, NB_P2), descending=True
    )

    # Costs in score order: decode the block index, gather its record's extent.
    low = skey - ((skey >> 32) << 32)  # 0 for padding keys
    slive = low > 0
    sidx = tl.where(slive, NB_P2 - low, 0)
    srec = tl.load(records_ptr + b * stride_rb + sidx * stride_rn, mask=slive, other=0)
    sstart = tl.load(rec_start_ptr + srec, mask=slive, other=0)
    send = tl.load(rec_end_ptr + srec, mask=slive, other=-1)
    scost = _block_cost(sstart, send, head_n, tail_from)
    # Costs are >= 0, so the prefix sum is non-decreasing and the fitting blocks are a prefix of
    # the sorted order: the chosen ones are exactly those whose key is >= the last fitting key.
    # That turns "scatter the choice back to block order" into one comparison in block order.
    # The first block that does not fit (the largest key below that) is cut to the room left.
    before = tl.cumsum(scost, 0)
    fits = (before <= room) & slive
    threshold = tl.min(tl.where(fits, skey, _KEY_MAX), axis=0)
    cut_key = tl.max(tl.where(slive & ~fits, skey, _KEY_NONE), axis=0)
    left = tl.maximum(room - tl.sum(tl.where(fits, scost, 0), axis=0), 0)
    # Block order again. Reloading the blocks instead of keeping them from before the sort keeps
    # the register pressure of a 4096-block row within 128 registers per thread (no spills).
    key = _sort_keys(scores_ptr, records_ptr, b, row, i, stride_rb, stride_rn, num_blocks, NB_P2)
    rec = tl.load(records_ptr + b * stride_rb + i * stride_rn, mask=i < num_blocks, other=-1)
    live = rec >= 0
    rec = tl.where(live, rec, 0)
    start = tl.load(rec_start_ptr + rec, mask=live, other=0)
    end = tl.load(rec_end_ptr + rec, mask=live, other=-1)  # start 0, end -1: cost 0
    cost = _block_cost(start, end, head_n, tail_from)
    chosen = live & (key >= threshold)
    cut = live & (key == cut_key)

    # Output layout: head positions, then the chosen blocks' middle parts (and the cut block's
    # first `left` of them) in block (= position) order, then the tail. incl[i] = end
    # (exclusive) of block i's run among the middle outputs.
    ccost = tl.where(chosen, cost, tl.where(cut, tl.minimum(cost, left), 0))
    incl = tl.cumsum(ccost, 0)
    # A middle output m inside block i is position m + shift[i].
    shift = tl.maximum(start, head_n) - (incl - ccost)
    i_ok = i < num_blocks
    tl.store(incl_ptr + row + i, incl, mask=i_ok)
    tl.store(shift_ptr + row + i, shift, mask=i_ok)
    count = head_n + tl.sum(ccost, axis=0) + (seq_len - tail_from)
    tl.store(counts_ptr + b * stride_cb + h * stride_ch, count.to(counts_ptr.dtype.element_ty))


# --- 3. expand to slots ----------------------------------------------------------------------------


@triton.jit
def _expand_kernel(
    incl_ptr,  # [B, KvH, NB] int64
    shift_ptr,  # [B, KvH, NB] int64
    counts_ptr,  # [B, KvH]
    req_slots_ptr,  # [B, max_len] int64
    seq_lens_ptr,
    keep_head_ptr,
    keep_tail_from_ptr,  # [B]
    out_ptr,  # [B, KvH, MAXB] int64
    stride_cb,
    stride_ch,
    stride_sb,
    stride_sp,
    stride_ob,
    stride_oh,
    stride_oo,
    num_kv_heads,
    num_blocks,
    max_out,
    BLOCK_O: tl.constexpr,
    SEARCH_STEPS: tl.constexpr,
):
    # One program per (request, KV head, tile of BLOCK_O output indices). Walking outputs instead
    # of positions makes every tile independent (no running offset), so a long sequence spreads
    # over many programs and the work is O(MAXB log NB), not O(seq_len).
    b = tl.program_id(0)
    h = tl.program_id(1)
    t = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b).to(tl.int64)
    tail_from = tl.load(keep_tail_from_ptr + b).to(tl.int64)
    head_n = tl.minimum(tl.load(keep_head_ptr + b).to(tl.int64), tail_from)
    count = tl.load(counts_ptr + b * stride_cb + h * stride_ch).to(tl.int64)
    mid_end = count - (seq_len - tail_from)  # first output index of the tail

    o = t * BLOCK_O + tl.arange(0, BLOCK_O).to(tl.int64)
    in_mid = (o >= head_n) & (o < mid_end)
    m = o - head_n
    # Block of middle output m: the first i with incl[i] > m (incl is non-decreasing; blocks that
    # were not chosen repeat the previous value and are skipped by the strict >).
    row = (b * num_kv_heads + h) * num_blocks
    lo = tl.zeros([BLOCK_O], tl.int64)
    hi = tl.zeros([BLOCK_O], tl.int64) + num_blocks
    for _ in tl.static_range(SEARCH_STEPS):
        active = in_mid & (lo < hi)
        mid = (lo + hi) >> 1
        v = tl.load(incl_ptr + row + mid, mask=active, other=0)
        right = active & (v <= m)
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(active & (v > m), mid, hi)
    shift = tl.load(shift_ptr + row + lo, mask=in_mid, other=0)
    pos = tl.where(o < head_n, o, tl.where(in_mid, m + shift, tail_from + (o - mid_end)))
    kept = o < count
    slot = tl.load(req_slots_ptr + b * stride_sb + pos * stride_sp, mask=kept, other=0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + o * stride_oo, slot, mask=o < max_out)


def _check(
    q,
    kmin,
    kmax,
    records,
    rec_start,
    rec_end,
    req_slots,
    seq_lens,
    keep_head,
    keep_tail_from,
    budgets,
    slots_out,
    counts_out,
) -> None:
    batch, num_blocks = records.shape
    num_kv_heads = kmin.shape[1]
    assert q.dim() == 3 and q.shape[0] == batch and q.shape[1] % num_kv_heads == 0, (q.shape, kmin.shape)
    assert kmin.dim() == 3 and kmin.shape == kmax.shape and kmin.shape[2] == q.shape[2], (kmin.shape, kmax.shape)
    assert kmin.stride() == kmax.stride(), "kmin/kmax are addressed with one set of strides"
    assert req_slots.dim() == 2 and req_slots.shape[0] == batch, req_slots.shape
    for v in (rec_start, rec_end, seq_lens, keep_head, keep_tail_from, budgets):
        assert v.dim() == 1 and v.stride(0) == 1, "1-D contiguous index vectors"
    for v in (seq_lens, keep_head, keep_tail_from, budgets):
        assert v.shape[0] == batch, v.shape
    assert slots_out.dim() == 3 and slots_out.shape[:2] == (batch, num_kv_heads), slots_out.shape
    assert slots_out.dtype == torch.int64, slots_out.dtype
    assert counts_out.shape == (batch, num_kv_heads), counts_out.shape


def select_slots(
    q: torch.Tensor,
    kmin: torch.Tensor,
    kmax: torch.Tensor,
    records: torch.Tensor,
    rec_start: torch.Tensor,
    rec_end: torch.Tensor,
    req_slots: torch.Tensor,
    seq_lens: torch.Tensor,
    keep_head: torch.Tensor,
    keep_tail_from: torch.Tensor,
    budgets: torch.Tensor,
    slots_out: torch.Tensor,
    counts_out: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KV slots each (request, KV head) attends to at this decode step and layer (Triton).

    Arguments and outputs as in the module docstring; slots_out [B, KvH, MAXB] and counts_out
    [B, KvH] are written in place and returned. No host sync, shapes only from tensor shapes, so
    it can be captured in a CUDA graph (the three scratch buffers come from the graph's pool).
    """
    _check(
        q,
        kmin,
        kmax,
        records,
        rec_start,
        rec_end,
        req_slots,
        seq_lens,
        keep_head,
        keep_tail_from,
        budgets,
        slots_out,
        counts_out,
    )
    scores = block_scores(q, kmin, kmax, records)
    batch, num_blocks = records.shape
    num_kv_heads = kmin.shape[1]
    if batch == 0:
        return slots_out, counts_out
    nb_p2 = max(16, triton.next_power_of_2(num_blocks))
    incl = torch.empty(batch, num_kv_heads, num_blocks, dtype=torch.int64, device=q.device)
    shift = torch.empty_like(incl)
    _choose_blocks_kernel[(batch, num_kv_heads)](
        scores,
        records,
        rec_start,
        rec_end,
        seq_lens,
        keep_head,
        keep_tail_from,
        budgets,
        incl,
        shift,
        counts_out,
        records.stride(0),
        records.stride(1),
        counts_out.stride(0),
        counts_out.stride(1),
        num_kv_heads,
        num_blocks,
        NB_P2=nb_p2,
        num_warps=_choose_warps(nb_p2),
    )
    max_out = slots_out.shape[2]
    if max_out == 0:
        return slots_out, counts_out
    _expand_kernel[(batch, num_kv_heads, triton.cdiv(max_out, BLOCK_O))](
        incl,
        shift,
        counts_out,
        req_slots,
        seq_lens,
        keep_head,
        keep_tail_from,
        slots_out,
        counts_out.stride(0),
        counts_out.stride(1),
        req_slots.stride(0),
        req_slots.stride(1),
        slots_out.stride(0),
        slots_out.stride(1),
        slots_out.stride(2),
        num_kv_heads,
        num_blocks,
        max_out,
        BLOCK_O=BLOCK_O,
        SEARCH_STEPS=nb_p2.bit_length(),  # enough halvings for any range of <= NB_P2 blocks
    )
    return slots_out, counts_out


def block_scores(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, records: torch.Tensor) -> torch.Tensor:
    """Kernel 1 alone (Triton): scores [B, KvH, NB] fp32, 0 where records is -1.

    q [B, H, D]; kmin, kmax [capacity, KvH, D]; records [B, NB] int64. Exposed so tests can
    feed the Triton scores to `select_from_scores_reference` and compare the rest exactly.
    """
    batch, num_blocks = records.shape
    num_kv_heads, head_dim = kmin.shape[1], kmin.shape[2]
    group = q.shape[1] // num_kv_heads
    scores = torch.zeros(batch, num_kv_heads, num_blocks, dtype=torch.float32, device=q.device)
    if batch == 0 or num_blocks == 0:
        return scores
    _block_scores_kernel[(batch, num_kv_heads, triton.cdiv(num_blocks, BLOCK_N))](
        q,
        kmin,
        kmax,
        records,
        scores,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        kmin.stride(0),
        kmin.stride(1),
        kmin.stride(2),
        records.stride(0),
        records.stride(1),
        num_kv_heads,
        num_blocks,
        group,
        head_dim,
        BLOCK_G=triton.next_power_of_2(group),
        BLOCK_N=BLOCK_N,
        BLOCK_D=triton.next_power_of_2(head_dim),
    )
    return scores


# --- torch reference -------------------------------------------------------------------------------


def select_slots_reference(
    q: torch.Tensor,
    kmin: torch.Tensor,
    kmax: torch.Tensor,
    records: torch.Tensor,
    rec_start: torch.Tensor,
    rec_end: torch.Tensor,
    req_slots: torch.Tensor,
    seq_lens: torch.Tensor,
    keep_head: torch.Tensor,
    keep_tail_from: torch.Tensor,
    budgets: torch.Tensor,
    slots_out: torch.Tensor,
    counts_out: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of `select_slots` (same arguments, same in-place outputs).

    Scores come from `block_select.score_blocks` request by request (a host sync per request),
    so they are bit for bit the per-request path's; the selection is batched and fixed-shape.
    """
    _check(
        q,
        kmin,
        kmax,
        records,
        rec_start,
        rec_end,
        req_slots,
        seq_lens,
        keep_head,
        keep_tail_from,
        budgets,
        slots_out,
        counts_out,
    )
    batch, num_blocks = records.shape
    scores = torch.zeros(batch, kmin.shape[1], num_blocks, dtype=torch.float32, device=q.device)
    for b in range(batch):
        recs = records[b][records[b] >= 0]
        if recs.numel():
            scores[b, :, : recs.numel()] = score_blocks(q[b], kmin[recs], kmax[recs])
    return select_from_scores_reference(
        scores,
        records,
        rec_start,
        rec_end,
        req_slots,
        seq_lens,
        keep_head,
        keep_tail_from,
        budgets,
        slots_out,
        counts_out,
    )


def select_from_scores_reference(
    scores: torch.Tensor,
    records: torch.Tensor,
    rec_start: torch.Tensor,
    rec_end: torch.Tensor,
    req_slots: torch.Tensor,
    seq_lens: torch.Tensor,
    keep_head: torch.Tensor,
    keep_tail_from: torch.Tensor,
    budgets: torch.Tensor,
    slots_out: torch.Tensor,
    counts_out: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The selection half of the reference, from given scores [B, KvH, NB] fp32 (batched torch):
    `block_select.select_positions_batched` mapped to KV slots. It builds a kept-position mask
    over [B, KvH, max_len], unlike the kernels, which map output indices to positions, so the two
    are independent implementations of the same rule.
    """
    batch, num_kv_heads, _ = scores.shape
    max_len = req_slots.shape[1]
    width = min(max_len, slots_out.shape[2])
    positions, counts = select_positions_batched(
        scores, records, rec_start, rec_end, seq_lens, keep_head, keep_tail_from, budgets, max_len, width
    )
    slots = req_slots.gather(1, positions.reshape(batch, -1)).view(batch, num_kv_heads, width)
    valid = torch.arange(width, device=scores.device) < counts[:, :, None]
    slots_out.zero_()
    slots_out[:, :, :width] = torch.where(valid, slots, 0)
    counts_out.copy_(counts)
    return slots_out, counts_out
