"""The causal, greedy DynSplit splitter.

Blocks are cut left to right: the block that starts at s ends at some e in
[s + C - Δ - 1, s + C + Δ - 1] (length C±Δ). Among the candidate delimiters in that window the
one with the highest DD-Select weight wins; ties go to the end closest to the ideal length C, then
to the earlier one; with no candidate in the window the block is cut at length C. The weight is
the candidate's own score ("position") or the mean score of all candidates so far with the same
token ("delimiter_type"). The ablation rules: "punctuation" takes the candidate closest to C
without scores, "fixed_interval" always cuts at C (Quest's pages).

Causality: every score in the window needs the `lookahead` queries after it, so the block is
decided exactly when position s + C + Δ - 1 + lookahead is known (s + C + Δ - 1 without scores),
never later and never using anything after it. That position is the block's *decision
position*; the block record is keyed by the KV slot at that position, so it depends only on
tokens that a radix-cache prefix shares.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from dynsplit_sglang.kernels.dd_select import candidate_scores, quantize

if TYPE_CHECKING:  # the policy module imports this one
    from dynsplit_sglang.policies.dynsplit import DynSplitOptions


@dataclass(frozen=True)
class Block:
    start: int  # first position
    end: int  # last position (inclusive)
    decided_at: int  # position whose token made the decision


def decision_position(open_start: int, cfg: DynSplitOptions) -> int:
    """Position at which the block starting at `open_start` gets decided."""
    return open_start + cfg.max_block - 1 + cfg.decision_delay


def split(
    open_start: int,
    known: int,
    band_rows: torch.Tensor | None,
    is_candidate: torch.Tensor,
    cfg: DynSplitOptions,
    token_ids: torch.Tensor | None = None,
    prior: dict[int, tuple[float, int]] | None = None,
) -> list[Block]:
    """Close every block of a sequence that can be decided with `known` tokens.

    open_start:   first position of the open block (0, or one past the last closed block).
    known:        number of tokens of the sequence whose DD-Select rows exist.
    band_rows:    [known - open_start, lookahead] rows of positions open_start .. known-1
                  (only read when cfg.split is "dd_select").
    is_candidate: [known - open_start] bool, whether the token at each position may end a block.
    token_ids:    [known - open_start] token ids, for cfg.weighting "delimiter_type".
    prior:        for "delimiter_type": token id -> (sum of scores, count) over the candidates
                  before open_start (`type_totals`).
    returns:      the new closed blocks, in order.
    """
    if decision_position(open_start, cfg) > known - 1:
        return []
    by_type = cfg.uses_scores and cfg.weighting == "delimiter_type"
    if cfg.uses_scores:
        # s_i of positions open_start .. known-lookahead-1 (every window lies in this range).
        scores = candidate_scores(band_rows[1:], cfg.lookahead)
        if by_type:
            totals = dict(prior or {})
            counted = open_start  # candidates before this position are in `totals`
    cands = is_candidate.tolist()
    ideal = cfg.block_size - 1 - cfg.window_lo  # offset of the length-C end in the window
    blocks: list[Block] = []
    s = open_start
    while decision_position(s, cfg) <= known - 1:
        lo = s + cfg.window_lo  # first allowed end position
        rel = lo - open_start
        best = None
        for off in range(cfg.window_width):
            if not cands[rel + off]:
                continue
            if cfg.uses_scores:
                weight = float(scores[rel + off])
                if by_type:
                    counted = _add_types(totals, scores, cands, token_ids, open_start, counted, lo + cfg.window_width)
                    total, count = totals[int(token_ids[rel + off])]
                    weight = quantize(total / count)
                key = (weight, -abs(off - ideal), -off)
            else:  # "punctuation": the delimiter closest to length C, the earlier on a tie
                key = (-abs(off - ideal), -off)
            if best is None or key > best[0]:
                best = (key, off)
        end = lo + (best[1] if best is not None else ideal)
        blocks.append(Block(s, end, decision_position(s, cfg)))
        s = end + 1
    return blocks


def _add_types(totals, scores, cands, token_ids, open_start, counted, upto) -> int:
    """Add the candidates of positions counted .. upto-1 to the per-type totals; returns upto."""
    for pos in range(counted, upto):
        rel = pos - open_start
        if cands[rel]:
            tid = int(token_ids[rel])
            total, count = totals.get(tid, (0.0, 0))
            totals[tid] = (total + float(scores[rel]), count + 1)
    return max(counted, upto)


def type_totals(
    scores: torch.Tensor, is_candidate: torch.Tensor, token_ids: torch.Tensor
) -> dict[int, tuple[float, int]]:
    """Per delimiter type (token id): (sum of DD-Select scores, count) over candidate positions.

    scores, is_candidate, token_ids: [n] of positions 0 .. n-1.
    """
    ids = token_ids[is_candidate].tolist()
    vals = scores[is_candidate].tolist()
    totals: dict[int, tuple[float, int]] = {}
    for tid, v in zip(ids, vals):
        total, count = totals.get(tid, (0.0, 0))
        totals[tid] = (total + v, count + 1)
    return totals
