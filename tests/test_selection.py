import pytest
import torch

from dynsplit_sglang.kernels.block_select import score_blocks, select_positions, select_positions_batched
from dynsplit_sglang.kernels.block_summary import block_min_max


def make_blocks(n, seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(12, 21, (n,), generator=g)
    starts = torch.cumsum(lengths, 0) - lengths
    return starts, starts + lengths - 1


def test_score_is_an_upper_bound_of_every_key_in_the_block():
    torch.manual_seed(0)
    keys = torch.randn(200, 2, 8)
    starts, ends = make_blocks(8, 0)
    lengths = ends - starts + 1
    slots = (starts[:, None] + torch.arange(int(lengths.max()))[None]).minimum(ends[:, None])
    kmin, kmax = block_min_max(keys, slots, lengths)
    q = torch.randn(4, 8)
    scores = score_blocks(q, kmin, kmax)  # [KvH, nb]
    qg = q.view(2, 2, 8)
    for b in range(8):
        k = keys[starts[b] : ends[b] + 1]  # [len, KvH, D]
        exact = torch.einsum("kgd,lkd->klg", qg, k).sum(-1).amax(dim=1)  # best key per KV head
        assert (scores[:, b] >= exact - 1e-5).all()


def test_selection_keeps_sink_tail_recent_and_fills_the_budget():
    starts, ends = make_blocks(30, 1)
    seq_len = int(ends[-1]) + 25  # 24 open tokens after the last closed block
    tail = int(ends[-1]) + 1
    for budget in (80, 128, 200, 333):
        for seed in range(5):
            scores = torch.randn(3, 30, generator=torch.Generator().manual_seed(seed))
            keep_tail_from = min(tail, seq_len - 32)
            pos, valid = select_positions(scores, starts, ends, seq_len, 4, keep_tail_from, budget)
            for h in range(3):
                p = pos[h][valid[h]]
                # exactly the budget: a fixed count per step (the GPU path plans once per step)
                assert p.numel() == min(budget, seq_len)
                assert p.unique().numel() == p.numel() and (p[1:] > p[:-1]).all()
                assert set(range(4)) <= set(p.tolist())
                assert set(range(keep_tail_from, seq_len)) <= set(p.tolist())
                assert int(p.max()) < seq_len


def test_selection_takes_blocks_in_score_order_whole():
    starts = torch.tensor([0, 16, 32, 48, 64])
    ends = starts + 15
    scores = torch.tensor([[0.0, 5.0, 1.0, 9.0, 2.0]])
    # sink 4 (inside block 0), tail from 80; budget leaves room for 32 more tokens: blocks 3 and 1.
    pos, valid = select_positions(scores, starts, ends, 90, 4, 80, 4 + 10 + 32)
    p = set(pos[0][valid[0]].tolist())
    assert p == set(range(4)) | set(range(80, 90)) | set(range(48, 64)) | set(range(16, 32))


def test_selection_cuts_the_first_block_that_does_not_fit():
    starts = torch.tensor([0, 16, 32, 48, 64])
    ends = starts + 15
    scores = torch.tensor([[0.0, 5.0, 1.0, 9.0, 2.0], [9.0, 0.0, 0.0, 0.0, 8.0]])
    # room for 40 tokens: blocks 3 and 1, then the first 8 of block 4 (head 0); head 1: block 0
    # (costs 12: its first 4 are the sink), block 4 (16), then 12 of block 1.
    pos, valid = select_positions(scores, starts, ends, 90, 4, 80, 4 + 10 + 40)
    always = set(range(4)) | set(range(80, 90))
    assert set(pos[0][valid[0]].tolist()) == always | set(range(48, 64)) | set(range(16, 32)) | set(range(64, 72))
    assert set(pos[1][valid[1]].tolist()) == always | set(range(4, 16)) | set(range(64, 80)) | set(range(16, 28))
    assert valid.sum(1).tolist() == [54, 54]


def test_selection_with_no_closed_block():
    pos, valid = select_positions(
        torch.zeros(2, 0), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), 50, 4, 10, 64
    )
    assert pos[0][valid[0]].tolist() == list(range(4)) + list(range(10, 50))


def test_batched_selection_is_the_per_request_selection():
    g = torch.Generator().manual_seed(3)
    reqs, capacity = [], 0
    for n_blocks, open_len, budget in ((30, 7, 120), (0, 9, 64), (12, 3, 500), (25, 20, 64), (18, 1, 100)):
        starts, ends = make_blocks(n_blocks, n_blocks)
        tail = int(ends[-1]) + 1 if n_blocks else 0
        reqs.append((starts, ends, tail + open_len, budget, capacity))
        capacity += n_blocks
    rec_start = torch.cat([r[0] for r in reqs])
    rec_end = torch.cat([r[1] for r in reqs])
    nb = max(r[0].numel() for r in reqs)
    records = torch.full((len(reqs), nb), -1)
    scores = torch.randn(len(reqs), 2, nb, generator=g)
    seq_lens, tails, budgets = [], [], []
    for b, (starts, ends, seq_len, budget, first) in enumerate(reqs):
        records[b, : starts.numel()] = torch.arange(first, first + starts.numel())
        seq_lens.append(seq_len)
        tails.append(max(0, min(int(ends[-1]) + 1 if ends.numel() else 0, seq_len - 8)))
        budgets.append(budget)
    t = torch.tensor
    positions, counts = select_positions_batched(
        scores, records, rec_start, rec_end, t(seq_lens), t([4] * 5), t(tails), t(budgets), max(seq_lens)
    )
    for b, (starts, ends, seq_len, budget, _) in enumerate(reqs):
        want, valid = select_positions(scores[b, :, : starts.numel()], starts, ends, seq_len, 4, tails[b], budget)
        assert counts[b].tolist() == valid.sum(1).tolist() == [min(budget, seq_len)] * 2
        assert torch.equal(positions[b, :, : want.shape[1]], want)


def decode_time_policy(name: str, shape, num_slots: int, device):
    """A decode-time policy for selection tests ("dynsplit", "fixed": DynSplit-KV with rigid
    blocks, "quest"), every token a candidate, eviction off (no prompt queries are fed), budget 64."""
    from dynsplit_sglang.config import KVConfig
    from dynsplit_sglang.policies import POLICY_CLASSES, DynSplitOptions, QuestOptions

    options = {
        "dynsplit": DynSplitOptions(candidates="all", evict=False),
        "fixed": DynSplitOptions(split="fixed_interval", candidates="all", evict=False),
        "quest": QuestOptions(evict=False),
    }[name]
    kv = KVConfig(policy=options.policy, budget=64, options=options)
    kv.validate()
    return POLICY_CLASSES[options.policy](kv, shape, num_slots, torch.float32, device)


@pytest.mark.parametrize("name", ["dynsplit", "fixed", "quest"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_block_runs_are_the_reference_rule_on_random_batches(name, seed):
    """The backend's selection (`select_batch`: blocks scored together, the chosen ones gathered
    as runs of positions) equals the reference rule (`select`: `select_positions`, one request at
    a time) in every layer, for a decode batch of requests with different lengths, budgets (one
    above its length, one with no closed block) and small integer keys and queries, so that
    scores tie often."""
    from dynsplit_sglang.block_table import ModelShape
    from dynsplit_sglang.policies import RequestView

    shape = ModelShape(num_layers=3, num_heads=6, num_kv_heads=2, head_dim=8)
    g = torch.Generator().manual_seed(seed)
    lens = [int(x) for x in torch.randint(30, 300, (5,), generator=g)] + [20]
    budgets = [int(x) for x in torch.randint(48, 200, (6,), generator=g)]
    budgets[1] = lens[1] + 5  # fits: every position
    slots = sum(lens) + len(lens)
    policy = decode_time_policy(name, shape, slots, "cpu")
    keys = torch.randint(-2, 3, (slots, shape.num_kv_heads, shape.head_dim), generator=g).float()
    starts = [sum(lens[:k]) + k for k in range(len(lens))]
    rows = [torch.arange(s, s + n + 1) for s, n in zip(starts, lens)]  # prompt + one decode slot
    reqs = [
        RequestView(r[:n], 0, torch.zeros(n, dtype=torch.int64), f"r{k}", k, b)
        for k, (r, n, b) in enumerate(zip(rows, lens, budgets))
    ]
    policy.begin_forward(reqs, False)
    policy.end_forward(reqs, [keys] * shape.num_layers)
    one = torch.zeros(1, dtype=torch.int64)
    reqs = [RequestView(r, n, one, f"r{k}", k, b) for k, (r, n, b) in enumerate(zip(rows, lens, budgets))]
    policy.begin_forward(reqs, True)
    some = [k for k in torch.randperm(len(reqs), generator=g).tolist() if k != 1 or seed == 0]
    for layer, order in enumerate([some, list(range(len(reqs))), some]):  # some, then all in order
        q = torch.randint(-2, 3, (len(order), shape.num_heads, shape.head_dim), generator=g).float()
        positions, valid = policy.select_batch(layer, order, q)
        for k, i in enumerate(order):
            want, want_valid = policy.select(layer, i, q[k])
            width = want.shape[1]
            assert valid[k].sum(-1).tolist() == want_valid.sum(-1).tolist() == [min(budgets[i], lens[i] + 1)] * 2
            assert torch.equal(positions[k, :, :width][want_valid], want[want_valid])
            assert not valid[k, :, width:].any()
