"""Decode-time block selection: score blocks against the query, keep the best within the budget."""

from __future__ import annotations

import torch


def score_blocks(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """Upper bound of q.k inside each block, summed over the query heads of each KV head.

    q:       [H, D] the decode query of one request.
    kmin:    [nb, KvH, D], kmax: [nb, KvH, D] block key bounds.
    returns: [KvH, nb] fp32; sum over the group of sum_d max(q_d*kmin_d, q_d*kmax_d).
    """
    num_heads, dim = q.shape
    num_kv_heads = kmin.shape[1]
    qg = q.float().view(num_kv_heads, num_heads // num_kv_heads, dim)  # [KvH, G, D]
    # max(q_d*kmin_d, q_d*kmax_d) takes kmax where q_d > 0 and kmin where q_d < 0: two matmuls.
    upper = torch.bmm(qg.clamp_min(0), kmax.float().permute(1, 2, 0)) + torch.bmm(
        qg.clamp_max(0), kmin.float().permute(1, 2, 0)
    )  # [KvH, G, nb]
    return upper.sum(dim=1)


def select_positions(
    scores: torch.Tensor,
    block_start: torch.Tensor,
    block_end: torch.Tensor,
    seq_len: int,
    keep_head: int,
    keep_tail_from: int,
    budget: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token positions each KV head attends to: always [0, keep_head) and [keep_tail_from, seq_len),
    plus blocks in score order until the budget is full; the first block that does not fit whole
    gives its leading positions, so a head keeps exactly min(budget, seq_len) positions (or
    head + tail when those alone exceed the budget). A fixed count per step is what lets the GPU
    path plan its attention once per step for every layer.

    scores:       [KvH, nb] block scores.
    block_start:  [nb] int64 first position of each closed block; block_end: [nb] last position.
    The closed blocks tile positions [0, block_end[-1]] in order (as the splitter makes them).
    returns:      positions [KvH, B] int64 (ascending, padded with 0) and valid [KvH, B] bool,
                  with B <= budget. Positions are the original ones (RoPE untouched).
    """
    # One rule, one implementation: this is the batched selection for a batch of one.
    device = scores.device
    num_blocks = scores.shape[1]

    def one(value: int) -> torch.Tensor:
        return torch.tensor([value], dtype=torch.int64, device=device)

    positions, counts = select_positions_batched(
        scores[None],
        torch.arange(num_blocks, device=device)[None],
        block_start,
        block_end,
        one(seq_len),
        one(keep_head),
        one(keep_tail_from),
        one(budget),
        max_len=seq_len,
    )
    width = positions.shape[2]
    valid = torch.arange(width, device=device)[None, :] < counts[0][:, None]
    return positions[0], valid


def select_positions_batched(
    scores: torch.Tensor,
    records: torch.Tensor,
    rec_start: torch.Tensor,
    rec_end: torch.Tensor,
    seq_lens: torch.Tensor,
    keep_head: torch.Tensor,
    keep_tail_from: torch.Tensor,
    budgets: torch.Tensor,
    max_len: int,
    width: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`select_positions` for a batch of requests at once (same rule, same positions).

    scores:   [B, KvH, NB] fp32 scores of each request's closed blocks (any value where records
              is -1).
    records:  [B, NB] int64 record ids of the closed blocks in position order, -1 after the last.
    rec_start, rec_end: [capacity] int64 first / last position of each record's block.
    seq_lens, keep_head, keep_tail_from, budgets: [B] int64; max_len >= every seq_len.
    returns:  positions [B, KvH, W] int64 (ascending, 0 after the kept ones) and counts [B, KvH]
              (kept positions, which may exceed W); W = width, or the largest count if None.
    """
    device = scores.device
    batch, num_kv_heads, num_blocks = scores.shape
    live = records >= 0  # [B, NB]
    rec = records.clamp_min(0)
    tail_from = keep_tail_from[:, None]  # [B, 1]
    head_n = torch.minimum(keep_head, keep_tail_from)[:, None]
    room = budgets - head_n[:, 0] - (seq_lens - keep_tail_from)  # [B]
    start, end = rec_start[rec], rec_end[rec]  # [B, NB]
    cost = ((end.clamp_max(tail_from - 1) - start.clamp_min(head_n) + 1).clamp_min(0)) * live

    # Padding sorts after every real block (stable: after a real -inf too) and costs nothing.
    masked = scores.masked_fill(~live[:, None, :], float("-inf"))
    order = torch.argsort(masked, dim=2, descending=True, stable=True)  # [B, KvH, NB]
    sorted_cost = cost[:, None, :].expand(-1, num_kv_heads, -1).gather(2, order)
    # Tokens each block gives: all while the room lasts, then the rest of the room, then none.
    before = torch.cumsum(sorted_cost, dim=2)
    sorted_taken = (room[:, None, None] - before + sorted_cost).clamp(min=0).minimum(sorted_cost)
    taken = torch.zeros(batch, num_kv_heads, num_blocks, dtype=torch.int64, device=device)
    taken.scatter_(2, order, sorted_taken)

    # Block of each position: the last block starting at or before it, if the position is inside.
    pos = torch.arange(max_len, device=device)
    starts = torch.where(live, start, max_len)  # ascending per row, padding past every position
    block_of = torch.searchsorted(starts.contiguous(), pos.expand(batch, -1).contiguous(), right=True) - 1
    block_of = block_of.clamp(0, max(num_blocks - 1, 0))
    if num_blocks:
        inside = (starts.gather(1, block_of) <= pos) & (pos <= end.gather(1, block_of))  # [B, max_len]
        # A position is kept if it is among its block's first `taken` costed positions.
        offset = pos - start.clamp_min(head_n).gather(1, block_of)  # [B, max_len]
        block_taken = taken.gather(2, block_of[:, None, :].expand(-1, num_kv_heads, -1))
        keep = (offset[:, None, :] < block_taken) & inside[:, None, :]
    else:
        keep = torch.zeros(batch, num_kv_heads, max_len, dtype=torch.bool, device=device)
    always = (pos < head_n) | (pos >= tail_from)  # [B, max_len]
    keep = (keep | always[:, None, :]) & (pos < seq_lens[:, None])[:, None, :]

    counts = keep.sum(dim=2)  # [B, KvH]
    if width is None:
        width = int(counts.max()) if counts.numel() else 0
    # Each kept position goes to its rank among its row's kept positions; the rest (and ranks
    # past the width) to a spare last column.
    rank = torch.cumsum(keep, dim=2) - 1
    rank = torch.where(keep & (rank < width), rank, width)
    positions = torch.zeros(batch, num_kv_heads, width + 1, dtype=torch.int64, device=device)
    positions.scatter_(2, rank, pos.expand(batch, num_kv_heads, -1))
    return positions[:, :, :width], counts
