import torch

from dynsplit_sglang.block_table import BlockTable, ModelShape
from dynsplit_sglang.policies import DynSplitOptions
from dynsplit_sglang.splitter import Block

SHAPE = ModelShape(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)


def test_records_follow_the_slot_that_decided_them():
    cfg = DynSplitOptions()
    table = BlockTable(200, SHAPE, cfg, torch.float32, "cpu")
    keys = [torch.randn(200, 2, 8), torch.randn(200, 2, 8)]
    row = torch.randperm(199)[:100] + 1  # slots of positions 0 .. 99, scattered like a real pool
    blocks = [Block(0, 13, 27), Block(14, 29, 41), Block(30, 45, 57)]
    table.add_blocks(row, blocks, keys)
    assert table.records_in_use == 3 == table.records_owned()
    recs = table.blocks_of(row)
    assert table.rec_start[recs].tolist() == [0, 14, 30] and table.rec_end[recs].tolist() == [13, 29, 45]
    assert table.open_start(table.blocks_of(row)) == 46
    assert table.open_start(table.blocks_of(row[:41])) == 14  # a prefix ending before the 2nd decision
    torch.testing.assert_close(table.kmax[1, recs[1]], keys[1][row[14:30]].amax(0))
    torch.testing.assert_close(table.kmin[0, recs[2]], keys[0][row[30:46]].amin(0))
    table.release_slots(row[41:42])  # the 2nd block's decision slot is freed
    assert table.records_in_use == 2 == table.records_owned()
    table.release_slots(row)
    assert table.records_in_use == 0 == table.records_owned()


def test_pool_grows_instead_of_failing():
    table = BlockTable(64, SHAPE, DynSplitOptions(), torch.float32, "cpu")
    cap = table.capacity
    keys = [torch.randn(64, 2, 8)] * 2
    row = torch.arange(64)
    for _ in range(cap + 5):
        table.add_blocks(row, [Block(0, 11, 30)], keys)
    assert table.capacity > cap
    table.reset()
    assert table.records_in_use == 0
