"""Decode-time block selection: score blocks against the query, keep the best within the budget."""

from __future__ import annotations

import torch


def score_blocks(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """Upper bound of q.k inside each block, summed over the query heads of each KV head.

    q:       [H, D] the decode query of one request.
    kmin:    [nb, KvH, D], kmax: [nb, KvH, D] block key bounds.
    returns: [KvH, nb] fp32; sum over the group of sum_d max(q_d*kmin_d, q_d*kmax_d).
    """
    return score_blocks_batched(q[None], kmin[None], kmax[None])[0]


def score_blocks_batched(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """`score_blocks` for R requests: q [R, H, D], kmin and kmax [R, NB, KvH, D] (each request's
    blocks, any padding); returns [R, KvH, NB] fp32.

    max(q_d*kmin_d, q_d*kmax_d) takes kmax where q_d > 0 and kmin where q_d < 0, so the group's
    sum is (sum_g q+) . kmax + (sum_g q-) . kmin: two products per block and KV head. Each score
    is a sum over D alone, whatever the batch, so a request scores the same bits in any batch.
    """
    batch, num_heads, dim = q.shape
    num_kv_heads = kmin.shape[2]
    qg = q.float().view(batch, num_kv_heads, num_heads // num_kv_heads, dim)
    positive = qg.clamp_min(0).sum(dim=2)[:, None]  # [R, 1, KvH, D]
    negative = qg.clamp_max(0).sum(dim=2)[:, None]
    upper = (kmax.float() * positive).sum(dim=3) + (kmin.float() * negative).sum(dim=3)  # [R, NB, KvH]
    return upper.transpose(1, 2)


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


def most_blocks_taken(cost: torch.Tensor, room: torch.Tensor) -> int:
    """The most blocks any row of a selection can take: cost [B, NB] int64 (0: gives nothing),
    room [B] int64. A block is taken while the blocks before it in score order cost less than
    the room, so at worst the cheapest blocks come first."""
    cheapest = torch.where(cost > 0, cost, torch.iinfo(cost.dtype).max // (cost.shape[1] + 1)).sort(dim=1).values
    before = torch.cumsum(cheapest, dim=1) - cheapest
    return int((before < room[:, None]).sum(dim=1).max()) if cost.numel() else 0


def score_order_keys(scores: torch.Tensor) -> torch.Tensor:
    """int64 keys [B, KvH, NB] whose descending order is the scores' stable descending order
    (ties by block index): the fp32 bits made order-preserving, the block index below them.
    Unique keys let `topk` take the best blocks, where a stable sort of every block would cost
    several times more."""
    num_blocks = scores.shape[2]
    bits = (scores.float() + 0.0).view(torch.int32).to(torch.int64)  # + 0.0: -0.0 ties with 0.0
    ordered = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    shift = max(1, num_blocks).bit_length()
    return (ordered << shift) + ((1 << shift) - 1 - torch.arange(num_blocks, device=scores.device))


def select_block_runs(
    scores: torch.Tensor,
    first: torch.Tensor,
    cost: torch.Tensor,
    head: torch.Tensor,
    head_valid: torch.Tensor,
    tail: torch.Tensor,
    tail_valid: torch.Tensor,
    room: torch.Tensor,
    run_len: int,
    most_taken: int,
    width: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`select_positions_batched` by block runs: the same rule and the same positions, built from
    the chosen blocks only (each block record addresses a run of at most `run_len` positions), so
    the work grows with the budget, not with the sequence.

    scores:   [B, KvH, NB] fp32 block scores (any value where cost is 0).
    first:    [B, NB] int64 first position a block gives (its start, past the always-kept head).
    cost:     [B, NB] int64 positions it gives before the always-kept tail (0: none, or padding).
    head, head_valid: [B, Hd] the always-kept first positions; tail, tail_valid: [B, Tl] the
              always-kept last ones (the open block and the recent window).
    room:     [B] int64 budget left for blocks once head and tail are kept.
    run_len:  >= every cost; most_taken: >= the blocks any row takes (`most_blocks_taken`).
    returns:  positions [B, KvH, W] int64 (ascending, 0 after the kept ones) and counts [B, KvH];
              W = width, or the largest count if None.
    """
    batch, num_kv_heads, num_blocks = scores.shape
    device = scores.device
    # The best `most_taken` blocks in score order (ties: position order); a block that gives
    # nothing sorts last and takes nothing, as padding does.
    keys = score_order_keys(scores.masked_fill(cost[:, None, :] == 0, float("-inf")))
    order = keys.topk(min(most_taken, num_blocks), dim=2).indices  # [B, KvH, k]
    sorted_cost = cost[:, None, :].expand(-1, num_kv_heads, -1).gather(2, order)
    before = torch.cumsum(sorted_cost, dim=2)
    sorted_taken = (room[:, None, None] - before + sorted_cost).clamp(min=0).minimum(sorted_cost)
    # The blocks that give anything are a prefix of the score order: the first `chosen` of it.
    chosen = int((sorted_taken > 0).sum(dim=2).max()) if sorted_taken.numel() else 0
    blocks, back = order[:, :, :chosen].sort(dim=2)  # in position order
    taken = sorted_taken[:, :, :chosen].gather(2, back)  # [B, KvH, k]
    steps = torch.arange(run_len, device=device)
    starts = first.gather(1, blocks.reshape(batch, -1)).view(batch, num_kv_heads, chosen)
    runs = (starts[..., None] + steps).flatten(2)  # [B, KvH, k * run_len]
    runs_valid = (steps < taken[..., None]).flatten(2)
    # Head, runs and tail are in ascending position order; each valid position moves to its rank.
    heads, tails = head[:, None, :].expand(-1, num_kv_heads, -1), tail[:, None, :].expand(-1, num_kv_heads, -1)
    pos = torch.cat([heads, runs, tails], 2)
    keep = torch.cat(
        [
            head_valid[:, None, :].expand(-1, num_kv_heads, -1),
            runs_valid,
            tail_valid[:, None, :].expand(-1, num_kv_heads, -1),
        ],
        2,
    )
    counts = keep.sum(dim=2)
    if width is None:
        width = int(counts.max()) if counts.numel() else 0
    rank = torch.cumsum(keep, dim=2) - 1
    rank = torch.where(keep & (rank < width), rank, width)
    positions = torch.zeros(batch, num_kv_heads, width + 1, dtype=torch.int64, device=device)
    positions.scatter_(2, rank, torch.where(keep, pos, 0))
    return positions[:, :, :width], counts
