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
    lo = torch.einsum("kgd,nkd->kgnd", qg, kmin.float())
    hi = torch.einsum("kgd,nkd->kgnd", qg, kmax.float())
    return torch.maximum(lo, hi).sum(dim=-1).sum(dim=1)


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
    plus whole blocks in score order while they fit in the budget.

    scores:       [KvH, nb] block scores.
    block_start:  [nb] int64 first position of each closed block; block_end: [nb] last position.
    returns:      positions [KvH, B] int64 (sorted, padded with 0) and valid [KvH, B] bool,
                  with B <= budget. Positions are the original ones (RoPE untouched).
    """
    device = scores.device
    num_kv_heads = scores.shape[0]
    keep_head = min(keep_head, keep_tail_from)
    mandatory = torch.cat(
        [torch.arange(keep_head, device=device), torch.arange(keep_tail_from, seq_len, device=device)]
    )
    room = budget - mandatory.numel()
    # Only the part of a block outside the always-kept ranges costs budget.
    lo = block_start.clamp_min(keep_head)
    hi = block_end.clamp_max(keep_tail_from - 1)
    cost = (hi - lo + 1).clamp_min(0)
    per_head = []
    for h in range(num_kv_heads):
        order = torch.argsort(scores[h], descending=True, stable=True)
        fits = torch.cumsum(cost[order], 0) <= room
        chosen = order[fits]
        chosen = chosen[cost[chosen] > 0]
        lens = cost[chosen]
        offsets = torch.arange(int(lens.sum()), device=device) - torch.repeat_interleave(
            torch.cumsum(lens, 0) - lens, lens
        )
        picked = torch.repeat_interleave(lo[chosen], lens) + offsets
        per_head.append(torch.sort(torch.cat([mandatory, picked])).values)
    width = max(p.numel() for p in per_head)
    positions = torch.zeros(num_kv_heads, width, dtype=torch.int64, device=device)
    valid = torch.zeros(num_kv_heads, width, dtype=torch.bool, device=device)
    for h, p in enumerate(per_head):
        positions[h, : p.numel()] = p
        valid[h, : p.numel()] = True
    return positions, valid
