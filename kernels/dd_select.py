"""DD-Select: how good a block boundary each token position would be, from attention statistics.

For a candidate boundary after position i, the next `L` queries q = i+1 .. i+L look at three
regions of keys:
    retained O_i = [i+1, q]          the new block the query belongs to
    local    M_i = [i-R+1, i]        the block that just closed (neither rewarded nor penalised)
    distant  D_i = [0, i-R]          everything further back
and the score is  s_i = mean over layers, heads and q of ( A(q, O_i) - alpha * A(q, D_i) ),
with A(q, X) the softmax attention mass that q puts on X. A high score means the following
tokens form a self-contained unit that needs little of the distant past: a semantic boundary.

Everything the score needs from query q is its attention mass on the `L + R` keys right before
it (a band) plus its row log-sum-exp, so we keep, per token q, one row of L numbers:
    c[q, j-1] = A(q, O_{q-j}) - alpha * A(q, D_{q-j})      for j = 1 .. L
and s_i = mean_j c[i+j, j-1]. Rows depend only on tokens <= q, which makes them safe to key by
KV slot and share through the radix cache.
"""

from __future__ import annotations

import torch

# Scores are compared after rounding to this grid, and ties are broken by a fixed rule, so float
# noise from different chunkings of the same prompt cannot flip a boundary.
SCORE_QUANTUM = 1.0 / 1024


def band_rows_from_logits(
    band_logits: torch.Tensor, lse: torch.Tensor, lookahead: int, local_window: int, alpha: float
) -> torch.Tensor:
    """Per-query DD-Select rows from band logits.

    band_logits: [..., W] fp32, W = lookahead + local_window; entry b is the logit of key q-b
                 (b = 0 is the query's own key); -inf where q-b < 0.
    lse:         [...] fp32, log-sum-exp of the query's logits over all keys it attends to.
    returns:     [..., lookahead] fp32 rows c[q, j-1], j = 1 .. lookahead.
    """
    probs = torch.exp(band_logits - lse.unsqueeze(-1))
    csum = torch.cumsum(probs, dim=-1)  # csum[b] = mass on keys q-b .. q
    j = torch.arange(1, lookahead + 1, device=band_logits.device)
    retained = csum[..., j - 1]  # keys q-j+1 .. q
    local = csum[..., j - 1 + local_window] - retained if local_window > 0 else torch.zeros_like(retained)
    distant = (1.0 - retained - local).clamp_min(0.0)
    return retained - alpha * distant


def band_logits(
    q: torch.Tensor,
    k: torch.Tensor,
    q_start: int,
    scale: float,
    width: int,
    heads: torch.Tensor | None = None,
    query_chunk: int = 1024,
) -> torch.Tensor:
    """Logits of each query against the `width` keys ending at its own position (causal band).

    q:       [n, H, D] queries at positions q_start .. q_start+n-1.
    k:       [T, KvH, D] keys at positions 0 .. T-1, T = q_start + n (only the last n+W-1 are read).
    width:   W, keys q-W+1 .. q of each query go into the band.
    heads:   optional [h] query-head indices (all H heads if None).
    returns: [h, n, W] fp32, entry b is the logit of key q-b (-inf before position 0).

    n x W work per head instead of the n x T of a full logits row: each query is multiplied only
    with its own sliding window of keys (an `unfold` view of the keys, no copy).
    """
    n, num_heads, dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads
    lo = max(0, q_start - width + 1)
    pad = k.new_zeros(width - 1 - (q_start - lo), num_kv_heads, dim)
    keys = torch.cat([pad, k[lo : q_start + n]]).float()  # row r holds position q_start - W + 1 + r
    windows = keys.unfold(0, width, 1)  # [n, KvH, D, W]: window i = positions q_start+i-W+1 .. q_start+i
    before_start = (q_start + torch.arange(n, device=q.device)[:, None] - torch.arange(width, device=q.device)) < 0
    out = []
    for c0 in range(0, n, query_chunk):
        c1 = min(n, c0 + query_chunk)
        qg = q[c0:c1].float().view(c1 - c0, num_kv_heads, group, dim)
        logits = torch.einsum("ckgd,ckdw->ckgw", qg, windows[c0:c1]) * scale
        out.append(logits.reshape(c1 - c0, num_heads, width).flip(-1))  # b = 0 is the query's own key
    band = torch.cat(out).masked_fill_(before_start[:, None, :], float("-inf")).transpose(0, 1)  # [H, n, W]
    return band if heads is None else band[heads]


def decode_band_logits(
    q: torch.Tensor,
    keys: torch.Tensor,
    slots: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    width: int,
    heads: torch.Tensor | None = None,
) -> torch.Tensor:
    """`band_logits` of one decode step's R requests at once: each one's new query (at position
    seq_len - 1) against the `width` keys ending at it.

    q:       [R, H, D]; keys: [num_slots, KvH, D] one layer's key buffer.
    slots:   [R, max_len] int64 KV slots of each request's positions; seq_lens: [R] int64.
    returns: [h, R, W] fp32, entry b the logit of key seq_len-1-b (-inf before position 0).
    """
    batch, num_heads, dim = q.shape
    num_kv_heads = keys.shape[1]
    pos = seq_lens[:, None] - 1 - torch.arange(width, device=q.device)  # [R, W]
    k = keys[slots.gather(1, pos.clamp_min(0))].float()  # [R, W, KvH, D]
    qg = q.float().view(batch, num_kv_heads, num_heads // num_kv_heads, dim)
    logits = torch.einsum("rkgd,rwkd->rkgw", qg, k).reshape(batch, num_heads, width) * scale
    band = logits.masked_fill_((pos < 0)[:, None, :], float("-inf")).transpose(0, 1)  # [H, R, W]
    return band if heads is None else band[heads]


def row_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    q_start: int,
    scale: float,
    heads: torch.Tensor | None = None,
    query_chunk: int = 256,
) -> torch.Tensor:
    """Log-sum-exp of each query's causal logits over keys 0 .. q: [h, n] fp32 (q, k, heads as in
    `band_logits`). Prefill takes it from the attention kernel instead; this is for decode steps
    and for tests."""
    n, num_heads, _ = q.shape
    total, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    head_ids = torch.arange(num_heads, device=q.device) if heads is None else heads
    kh = k.float().transpose(0, 1)[head_ids // group]  # [h, T, D]
    key_pos = torch.arange(total, device=q.device)
    lses = []
    # Chunk the queries so the [h, chunk, T] logits stay small on long prompts.
    for c0 in range(0, n, query_chunk):
        c1 = min(n, c0 + query_chunk)
        pos = q_start + torch.arange(c0, c1, device=q.device)  # [c]
        logits = torch.einsum("chd,htd->hct", q[c0:c1, head_ids].float(), kh) * scale
        logits.masked_fill_(key_pos[None, None, :] > pos[None, :, None], float("-inf"))
        lses.append(torch.logsumexp(logits, dim=-1))
    return torch.cat(lses, dim=1)


def band_logits_and_lse(
    q: torch.Tensor, k: torch.Tensor, q_start: int, scale: float, width: int, heads: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`band_logits` [h, n, W] and `row_lse` [h, n] of one request's new queries."""
    return band_logits(q, k, q_start, scale, width, heads), row_lse(q, k, q_start, scale, heads)


def dd_band_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    q_start: int,
    scale: float,
    lookahead: int,
    local_window: int,
    alpha: float,
    heads: torch.Tensor | None = None,
) -> torch.Tensor:
    """DD-Select rows of one request's new queries in one layer, averaged over heads.

    q: [n, H, D], k: [T, KvH, D] as in `band_logits_and_lse`; returns [n, lookahead] fp32.
    """
    band, lse = band_logits_and_lse(q, k, q_start, scale, lookahead + local_window, heads)
    return band_rows_from_logits(band, lse, lookahead, local_window, alpha).mean(dim=0)


def candidate_scores(rows: torch.Tensor, lookahead: int) -> torch.Tensor:
    """Scores s_i of consecutive candidate positions from the rows of the queries after them.

    rows:    [m + lookahead - 1, lookahead] fp32, rows of positions i0+1 .. i0+m+lookahead-1.
    returns: [m] fp32, s_i for i = i0 .. i0+m-1: mean_j row(i+j)[j-1], rounded to SCORE_QUANTUM.
    """
    m = rows.shape[0] - lookahead + 1
    j = torch.arange(1, lookahead + 1, device=rows.device)
    i = torch.arange(m, device=rows.device)
    picked = rows[i[:, None] + j[None, :] - 1, j[None, :] - 1]  # [m, L]
    return quantize(picked.mean(dim=1))


def quantize(x):
    """Round scores (a tensor or a float) to the SCORE_QUANTUM grid."""
    if isinstance(x, torch.Tensor):
        return torch.round(x / SCORE_QUANTUM) * SCORE_QUANTUM
    return round(x / SCORE_QUANTUM) * SCORE_QUANTUM
