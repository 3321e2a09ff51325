"""The causal, greedy DynSplit splitter.

Blocks are cut left to right: the block that starts at s ends at some e in
[s + C - Δ - 1, s + C + Δ - 1] (length C±Δ). Among the candidate delimiters in that window the
one with the highest DD-Select score wins; ties go to the end closest to the ideal length C, then
to the earlier one; with no candidate in the window the block is cut at length C.

Causality: every score in the window needs the `lookahead` queries after it, so the block is
decided exactly when position s + C + Δ - 1 + lookahead is known, never later and never using
anything after it. That position is the block's *decision position*; the block record is keyed by
the KV slot at that position, so it depends only on tokens that a radix-cache prefix shares.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dynsplit_sglang.config import DynSplitConfig
from dynsplit_sglang.kernels.dd_select import candidate_scores


@dataclass(frozen=True)
class Block:
    start: int  # first position
    end: int  # last position (inclusive)
    decided_at: int  # position whose token made the decision


def decision_position(open_start: int, cfg: DynSplitConfig) -> int:
    """Position at which the block starting at `open_start` gets decided."""
    return open_start + cfg.max_block - 1 + cfg.lookahead


def split(
    open_start: int,
    known: int,
    band_rows: torch.Tensor,
    is_candidate: torch.Tensor,
    cfg: DynSplitConfig,
) -> list[Block]:
    """Close every block of a sequence that can be decided with `known` tokens.

    open_start:   first position of the open block (0, or one past the last closed block).
    known:        number of tokens of the sequence whose DD-Select rows exist.
    band_rows:    [known - open_start, lookahead] rows of positions open_start .. known-1.
    is_candidate: [known - open_start] bool, whether the token at each position may end a block.
    returns:      the new closed blocks, in order.
    """
    blocks: list[Block] = []
    s = open_start
    first_end = cfg.min_block - 1
    width = 2 * cfg.delta + 1
    while decision_position(s, cfg) <= known - 1:
        lo = s + first_end  # first allowed end position
        rel = lo - open_start
        rows = band_rows[rel + 1 : rel + 1 + width - 1 + cfg.lookahead]  # queries after lo .. lo+width-1
        scores = candidate_scores(rows, cfg.lookahead).tolist()
        cands = is_candidate[rel : rel + width].tolist()
        ideal = cfg.block_size - cfg.min_block  # offset of the length-C end in the window
        best = None
        for off in range(width):
            if not cands[off]:
                continue
            key = (scores[off], -abs(off - ideal), -off)
            if best is None or key > best[0]:
                best = (key, off)
        end = lo + (best[1] if best is not None else ideal)
        blocks.append(Block(s, end, decision_position(s, cfg)))
        s = end + 1
    return blocks
