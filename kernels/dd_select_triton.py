"""Triton kernel for DD-Select band rows, next to its torch reference.

`dd_band_rows_from_lse` computes the same [n, lookahead] rows as `dd_select.dd_band_rows` (see
that module's docstring for the score), but takes each query's row log-sum-exp from the prefill
attention kernel instead of recomputing it, so it only ever reads the W = lookahead + local_window
keys right before each query: O(n * W) work per head instead of O(n * T).

For query q and band offset b (key q-b), with p = exp(logit - lse[q]) the attention probability:
    retained(q, j) = sum_{b <= j-1} p          mass on keys q-j+1 .. q
    near(q, j)     = sum_{b <= j-1+R} p        retained plus the local window
    row[q, j-1]    = retained - alpha * max(0, 1 - near)
averaged over the (selected) heads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dynsplit_sglang.kernels.dd_select import band_logits, band_rows_from_logits

# Queries per program. The program reads the BLOCK_N + W - 1 keys that the band of its queries
# covers, so with W = 24 (the default config) about 60% of the key tile is useful.
BLOCK_N = 16
# Head-dim slice per dot step, and warps per program. The fp32 dot runs on CUDA cores, whose
# layout holds a whole D slice of both operands per thread; 32-wide slices with 8 warps keep it
# under the register file (checked with ptxas in the compile test: no spills at W = 24, D = 128).
BLOCK_D = 32
NUM_WARPS = 8


@triton.jit(do_not_specialize=["n", "q_start"])
def _dd_band_rows_kernel(
    q_ptr,  # [n, H, D]
    k_ptr,  # [T, KvH, D]
    lse_ptr,  # [H, n] fp32
    heads_ptr,  # [num_h] int64 (unused unless HAS_HEADS)
    out_ptr,  # [n, LOOKAHEAD] fp32
    n,
    q_start,
    num_keys,
    num_h,
    group,
    head_dim,
    stride_qn,
    stride_qh,
    stride_qd,
    stride_kt,
    stride_kh,
    stride_kd,
    stride_lh,
    stride_ln,
    stride_on,
    stride_ol,
    scale,
    alpha,
    LOOKAHEAD: tl.constexpr,
    LOCAL: tl.constexpr,
    HAS_HEADS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # >= BLOCK_N + W - 1, a power of two
    BLOCK_D: tl.constexpr,  # head-dim slice per dot step
    BLOCK_L: tl.constexpr,
):
    # One program per BLOCK_N consecutive queries. The heads are looped inside the program (not
    # spread over the grid with atomics) so the head average is summed in a fixed order and the
    # rows are bit-reproducible: boundary decisions must not flip with float noise.
    W: tl.constexpr = LOOKAHEAD + LOCAL
    i0 = tl.program_id(0) * BLOCK_N
    i = i0 + tl.arange(0, BLOCK_N)
    i_ok = i < n
    q_pos = q_start + i
    # Keys of the union of this program's bands: positions q_pos[0]-W+1 .. q_pos[-1].
    k_pos = q_start + i0 - (W - 1) + tl.arange(0, BLOCK_K)
    k_ok = (k_pos >= 0) & (k_pos < num_keys)
    # 64-bit row indices: a long prompt's q or k tensor can exceed 2**31 elements.
    k_row = tl.where(k_ok, k_pos, 0).to(tl.int64)
    q_row = i.to(tl.int64)
    dist = q_pos[:, None] - k_pos[None, :]  # [BLOCK_N, BLOCK_K] band offset b of each key per query
    in_band = (dist >= 0) & (dist < W) & i_ok[:, None] & k_ok[None, :]
    c = tl.arange(0, BLOCK_L)  # output column c = j - 1

    acc = tl.zeros([BLOCK_N, BLOCK_L], tl.float32)
    for hi in range(num_h):
        if HAS_HEADS:
            h = tl.load(heads_ptr + hi)
        else:
            h = hi
        kv_head = h // group
        # Logits of the queries against the key tile, a D slice at a time.
        logits = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        for d0 in range(0, head_dim, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            d_ok = d < head_dim
            qt = tl.load(
                q_ptr + q_row[:, None] * stride_qn + h * stride_qh + d[None, :] * stride_qd,
                mask=i_ok[:, None] & d_ok[None, :],
                other=0.0,
            ).to(tl.float32)
            kt = tl.load(
                k_ptr + k_row[:, None] * stride_kt + kv_head * stride_kh + d[None, :] * stride_kd,
                mask=k_ok[:, None] & d_ok[None, :],
                other=0.0,
            ).to(tl.float32)
            logits += tl.dot(qt, tl.trans(kt), input_precision="ieee")
        logits = logits * scale
        lse = tl.load(lse_ptr + h * stride_lh + i * stride_ln, mask=i_ok, other=0.0).to(tl.float32)
        p = tl.where(in_band, tl.exp(logits - lse[:, None]), 0.0)
        # Prefix masses by band offset, for every output column at once: [BLOCK_N, BLOCK_K, BLOCK_L].
        p3 = p[:, :, None]
        dist3 = dist[:, :, None]
        c3 = c[None, None, :]
        retained = tl.sum(tl.where(dist3 <= c3, p3, 0.0), axis=1)
        near = tl.sum(tl.where(dist3 <= c3 + LOCAL, p3, 0.0), axis=1)
        acc += retained - alpha * tl.maximum(1.0 - near, 0.0)

    rows = acc / num_h
    ok = i_ok[:, None] & (c[None, :] < LOOKAHEAD)
    tl.store(out_ptr + i[:, None] * stride_on + c[None, :] * stride_ol, rows, mask=ok)


def dd_band_rows_from_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    q_start: int,
    scale: float,
    lookahead: int,
    local_window: int,
    alpha: float,
    lse: torch.Tensor,
    heads: torch.Tensor | None = None,
) -> torch.Tensor:
    """DD-Select rows of one request's new queries in one layer, averaged over heads (Triton).

    q:       [n, H, D] queries at positions q_start .. q_start+n-1 (fp32/fp16/bf16).
    k:       [T, KvH, D] keys at positions 0 .. T-1, T >= q_start + n, H % KvH == 0 (GQA); only
             the W = lookahead + local_window keys before each query are read.
    lse:     [H, n] fp32 natural-log log-sum-exp of each query's (scaled) causal logits over keys
             0 .. q, all heads, e.g. from the prefill attention kernel (any strides, so the
             transpose of an [n, H] tensor works).
    heads:   optional [h] int64 query-head indices to average over (all H if None).
    returns: [n, lookahead] fp32, the rows of `dd_select.dd_band_rows`.
    """
    n, num_heads, head_dim = q.shape
    num_keys, num_kv_heads, _ = k.shape
    assert num_heads % num_kv_heads == 0 and k.shape[2] == head_dim
    assert num_keys >= q_start + n and lse.shape == (num_heads, n), (num_keys, q_start, n, lse.shape)
    assert lookahead >= 1 and local_window >= 0
    out = torch.empty(n, lookahead, dtype=torch.float32, device=q.device)
    if n == 0:
        return out
    num_h = num_heads if heads is None else heads.shape[0]
    width = lookahead + local_window
    # tl.dot needs every tile dimension >= 16.
    block_k = max(16, triton.next_power_of_2(BLOCK_N + width - 1))
    block_d = max(16, min(BLOCK_D, triton.next_power_of_2(head_dim)))
    _dd_band_rows_kernel[(triton.cdiv(n, BLOCK_N),)](
        q,
        k,
        lse,
        out if heads is None else heads,
        out,
        n,
        q_start,
        num_keys,
        num_h,
        num_heads // num_kv_heads,
        head_dim,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        lse.stride(0),
        lse.stride(1),
        out.stride(0),
        out.stride(1),
        float(scale),
        float(alpha),
        LOOKAHEAD=lookahead,
        LOCAL=local_window,
        HAS_HEADS=heads is not None,
        BLOCK_N=BLOCK_N,
        BLOCK_K=block_k,
        BLOCK_D=block_d,
        BLOCK_L=triton.next_power_of_2(lookahead),
        num_warps=NUM_WARPS,
    )
    return out


def dd_band_rows_from_lse_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    q_start: int,
    scale: float,
    lookahead: int,
    local_window: int,
    alpha: float,
    lse: torch.Tensor,
    heads: torch.Tensor | None = None,
) -> torch.Tensor:
    """Torch reference of `dd_band_rows_from_lse`, from `band_logits` and `band_rows_from_logits`."""
    if q.shape[0] == 0:
        return torch.empty(0, lookahead, dtype=torch.float32, device=q.device)
    band = band_logits(q, k, q_start, scale, lookahead + local_window, heads)  # [h, n, W]
    lse = lse.float() if heads is None else lse.float()[heads]
    return band_rows_from_logits(band, lse, lookahead, local_window, alpha).mean(dim=0)
