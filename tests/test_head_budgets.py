"""The oracle behind benchmarks/accuracy/head_budgets.py: per-head and shared block choice."""

import pytest
import torch

from benchmarks.accuracy.head_budgets import BLOCK, RECENT, SINK, block_mass, recalls


def test_block_mass_splits_sink_blocks_and_recent_window():
    n = SINK + 3 * BLOCK + RECENT
    mass = torch.arange(n, dtype=torch.float32).repeat(2, 1)
    kept, blocks = block_mass(mass, n)
    assert blocks.shape == (2, 3)
    assert torch.allclose(kept + blocks.sum(-1), mass.sum(-1))
    assert blocks[0, 0] == mass[0, SINK : SINK + BLOCK].sum()


def test_sharing_moves_blocks_to_the_head_whose_attention_is_spread():
    # head 0: all its block mass on one block; head 1: spread evenly over eight
    blocks = torch.zeros(2, 8)
    blocks[0, 0] = 0.5
    blocks[1] = 0.5 / 8
    kept = torch.full((2,), 0.5)
    own, shared, own_blocks, shared_blocks, share = recalls(kept, blocks, k=2)
    assert own == pytest.approx((1.0 + 0.5 + 0.125) / 2)  # head 0 wastes its second block
    assert shared == pytest.approx((1.0 + 0.5 + 3 * 0.0625) / 2)  # head 1 takes three of the four
    assert shared_blocks > own_blocks and share == pytest.approx(0.75)
    same = recalls(kept, blocks[1].repeat(2, 1), k=2)  # identical heads: sharing changes nothing
    assert same[0] == pytest.approx(same[1]) and same[2] == pytest.approx(same[3])


def test_results_name_the_module_that_ran(monkeypatch):
    """run_info's command names a subpackage's module in full (it once wrote benchmarks.head_budgets)."""
    import sys
    import types

    from benchmarks.common import main_module

    for name, shown in [
        ("benchmarks.accuracy.head_budgets", None),
        ("benchmarks.accuracy.__main__", "benchmarks.accuracy"),
    ]:
        fake = types.SimpleNamespace(__spec__=types.SimpleNamespace(name=name))
        monkeypatch.setitem(sys.modules, "__main__", fake)
        assert main_module() == (shown or name)
