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
    device = scores.device
    num_kv_heads, num_blocks = scores.shape
    keep_head = min(keep_head, keep_tail_from)
    room = budget - keep_head - (seq_len - keep_tail_from)
    # Only the part of a block outside the always-kept ranges costs budget.
    lo = block_start.clamp_min(keep_head)
    hi = block_end.clamp_max(keep_tail_from - 1)
    cost = (hi - lo + 1).clamp_min(0)
    order = torch.argsort(scores, dim=1, descending=True, stable=True)  # [KvH, nb]
    before = torch.cumsum(cost[order], dim=1)  # cost of the blocks up to each, in score order
    # Tokens each block contributes: all while it fits, then what is left of the room (the
    # prefix sums are non-decreasing, so this is whole blocks, one cut block, then nothing).
    taken = (room - before + cost[order]).clamp(min=0).minimum(cost[order])
    taken_of = torch.zeros(num_kv_heads, num_blocks + 1, dtype=torch.int64, device=device)
    taken_of[:, :num_blocks].scatter_(1, order, taken)
    # Block of every position (num_blocks = none), then the kept-position mask per KV head:
    # position p of block b is kept when it is among b's first taken_of[b] costed positions.
    pos = torch.arange(seq_len, device=device)
    block_of = torch.full((seq_len,), num_blocks, dtype=torch.int64, device=device)
    first = torch.zeros(num_blocks + 1, dtype=torch.int64, device=device)
    if num_blocks:
        block_of[: int(block_end[-1]) + 1] = torch.repeat_interleave(
            torch.arange(num_blocks, device=device), block_end - block_start + 1
        )
        first[:num_blocks] = lo
    keep = (pos - first[block_of]) < taken_of.index_select(1, block_of)  # [KvH, seq_len]
    keep[:, :keep_head] = True
    keep[:, keep_tail_from:] = True
    counts = keep.sum(dim=1)
    width = int(counts.max())
    # Kept positions in ascending order: each goes to its rank among its head's kept positions;
    # dropped ones go to a spare last column. Padding stays 0.
    rank = torch.where(keep, torch.cumsum(keep, dim=1) - 1, width)
    positions = torch.zeros(num_kv_heads, width + 1, dtype=torch.int64, device=device)
    positions.scatter_(1, rank, pos.expand(num_kv_heads, -1))
    valid = torch.arange(width, device=device)[None, :] < counts[:, None]
    return positions[:, :width], valid
