import torch

from dynsplit_sglang.policies import DynSplitOptions
from dynsplit_sglang.splitter import decision_position, split

CFG = DynSplitOptions(block_size=16, delta=4, lookahead=8)


def random_sequence(n, seed, candidate_rate=0.3):
    g = torch.Generator().manual_seed(seed)
    rows = torch.rand(n, CFG.lookahead, generator=g)
    cand = torch.rand(n, generator=g) < candidate_rate
    return rows, cand


def split_incrementally(rows, cand, cuts):
    """Split as chunked prefill / decode would: known grows, state carried by the last block."""
    blocks, start = [], 0
    for known in cuts:
        new = split(start, known, rows[start:known], cand[start:known], CFG)
        blocks += new
        if new:
            start = new[-1].end + 1
    return blocks


def test_block_lengths_stay_within_c_plus_minus_delta():
    for seed in range(20):
        rows, cand = random_sequence(1000, seed, candidate_rate=[0.0, 0.05, 0.3, 1.0][seed % 4])
        blocks = split(0, 1000, rows, cand, CFG)
        assert blocks[0].start == 0
        for a, b in zip(blocks, blocks[1:]):
            assert b.start == a.end + 1
        for b in blocks:
            assert CFG.min_block <= b.end - b.start + 1 <= CFG.max_block
        # The open tail is what could not be decided yet.
        assert decision_position(blocks[-1].end + 1, CFG) > 999


def test_split_is_causal_and_chunking_invariant():
    rows, cand = random_sequence(700, 7)
    whole = split(0, 700, rows, cand, CFG)
    for cuts in ([700], [1, 2, 3, 50, 700], list(range(1, 701)), [64, 128, 300, 301, 650, 700]):
        assert split_incrementally(rows, cand, cuts) == whole
    # A boundary never looks further than its decision position.
    for b in whole:
        assert b.decided_at == decision_position(b.start, CFG)
        assert b.end + CFG.lookahead <= b.decided_at


def test_future_tokens_never_change_decided_blocks():
    rows, cand = random_sequence(500, 3)
    blocks = split(0, 300, rows[:300], cand[:300], CFG)
    rows2, cand2 = rows.clone(), cand.clone()
    rows2[300:] = torch.rand(200, CFG.lookahead)
    cand2[300:] = ~cand2[300:]
    assert split(0, 500, rows2, cand2, CFG)[: len(blocks)] == blocks


def test_the_best_scoring_candidate_wins_and_ties_prefer_length_c():
    n = 200
    rows = torch.zeros(n, CFG.lookahead)
    cand = torch.zeros(n, dtype=torch.bool)
    cand[[12, 14, 18]] = True  # allowed ends of the first block: positions 11 .. 19
    blocks = split(0, n, rows, cand, CFG)
    assert blocks[0].end == 14  # all tie: closest to the ideal end 15, then the earlier one
    rows[19:27, :] = 0.0
    for j in range(1, CFG.lookahead + 1):  # make candidate 18 score highest: rows of 19 .. 26
        rows[18 + j, j - 1] = 0.5
    assert split(0, n, rows, cand, CFG)[0].end == 18


def test_no_candidate_in_window_cuts_at_c():
    rows = torch.rand(100, CFG.lookahead)
    cand = torch.zeros(100, dtype=torch.bool)
    blocks = split(0, 100, rows, cand, CFG)
    assert all(b.end - b.start + 1 == CFG.block_size for b in blocks)
