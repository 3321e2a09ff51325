"""Batched block selection: Triton kernels vs the batched torch reference vs the per-request path.

On CPU the kernels run in the Triton interpreter (conftest sets TRITON_INTERPRET=1 before they are
imported): fp32, small shapes, every Triton call costs ~1 s here, so each test makes one or two.
`-m gpu` runs bf16/fp16 at serving-like shapes and a CUDA-graph replay. The compile check lowers
the kernels to sm_90 PTX/cubin without a GPU, in a subprocess.

Exactness rule: given the same scores, the Triton selection equals the reference bit for bit
(integer positions). The scores themselves are fp32 sums in a different order (the kernel folds
the query group first), so they agree to rounding, and end to end the selection can differ only
where two blocks' scores are within that rounding. The CPU cases avoid such near-ties (random
fp32 data) or make every sum exact (small integers, where ties are exact and plentiful).
"""

from dataclasses import dataclass

import pytest
import torch

from dynsplit_sglang.kernels.block_select import score_blocks, select_positions
from dynsplit_sglang.kernels.block_select_triton import (
    block_scores,
    select_from_scores_reference,
    select_slots,
    select_slots_reference,
)
from tests.sm90 import lower_in_subprocess


@dataclass
class Req:
    blocks: list  # closed block lengths, in position order
    open_len: int  # the open tail block
    budget: int
    sink: int = 4
    recent: int = 4


def make_batch(
    reqs,
    *,
    kv_heads=2,
    group=2,
    dim=16,
    capacity=None,
    max_len_extra=3,
    integer=False,
    seed=0,
    device="cpu",
    dtype=torch.float32,
):
    """Records, slots and keys for a batch the way the policy would hand them to `select_slots`."""
    g = torch.Generator().manual_seed(seed)
    batch = len(reqs)
    nb = max((len(r.blocks) for r in reqs), default=0)
    total = sum(len(r.blocks) for r in reqs)
    capacity = capacity or total + 5
    records = torch.full((batch, nb), -1, dtype=torch.int64)
    rec_start = torch.randint(0, 50, (capacity,), generator=g)  # unused records hold garbage
    rec_end = rec_start + 3
    perm = torch.randperm(capacity, generator=g)
    seq_lens, tails = [], []
    k = 0
    for b, r in enumerate(reqs):
        pos = 0
        for j, n in enumerate(r.blocks):
            rec = perm[k]
            k += 1
            records[b, j] = rec
            rec_start[rec], rec_end[rec] = pos, pos + n - 1
            pos += n
        tails.append(pos)
        seq_lens.append(pos + r.open_len)
    max_len = max(seq_lens, default=0) + max_len_extra
    # Distinct slots >= 1 (0 is the padding slot), garbage past each row's seq_len.
    req_slots = torch.randperm(batch * max_len + 10, generator=g)[: batch * max_len].view(batch, max_len) + 1
    seq_lens = torch.tensor(seq_lens, dtype=torch.int64)
    # As `DynSplitPolicy.select`: the tail starts at the open block or the recent window.
    keep_tail_from = torch.tensor(
        [max(0, min(t, s - r.recent)) for t, s, r in zip(tails, seq_lens.tolist(), reqs)], dtype=torch.int64
    )
    keep_head = torch.tensor([r.sink for r in reqs], dtype=torch.int64)
    budgets = torch.tensor([r.budget for r in reqs], dtype=torch.int64)
    shape_q, shape_k = (batch, kv_heads * group, dim), (capacity, kv_heads, dim)
    if integer:
        # Small integers: every product and sum is exact in fp32 (and bf16/fp16 inputs), in any
        # order, so scores tie exactly and often.
        q = torch.randint(-2, 3, shape_q, generator=g).float()
        kmin = torch.randint(-2, 2, shape_k, generator=g).float()
        kmax = kmin + torch.randint(0, 2, shape_k, generator=g).float()
    else:
        q = torch.randn(shape_q, generator=g)
        kmin = torch.randn(shape_k, generator=g)
        kmax = kmin + torch.rand(shape_k, generator=g)
    t = lambda x: x.to(device)  # noqa: E731
    f = lambda x: x.to(device=device, dtype=dtype)  # noqa: E731
    return dict(
        q=f(q),
        kmin=f(kmin),
        kmax=f(kmax),
        records=t(records),
        rec_start=t(rec_start),
        rec_end=t(rec_end),
        req_slots=t(req_slots),
        seq_lens=t(seq_lens),
        keep_head=t(keep_head),
        keep_tail_from=t(keep_tail_from),
        budgets=t(budgets),
    )


def run(fn, inputs, max_out, counts_dtype=torch.int32):
    """Call `fn` on fresh output buffers filled with garbage, so unwritten entries show."""
    batch, kv_heads = inputs["records"].shape[0], inputs["kmin"].shape[1]
    device = inputs["q"].device
    slots = torch.full((batch, kv_heads, max_out), -7, dtype=torch.int64, device=device)
    counts = torch.full((batch, kv_heads), -7, dtype=counts_dtype, device=device)
    out = fn(**inputs, slots_out=slots, counts_out=counts)
    assert out[0] is slots and out[1] is counts
    return slots, counts


def per_request(inputs, max_out):
    """The existing per-request path: score_blocks + select_positions, mapped through req_slots."""
    want_slots, want_counts = [], []
    for b in range(inputs["records"].shape[0]):
        recs = inputs["records"][b]
        recs = recs[recs >= 0]
        scores = score_blocks(inputs["q"][b], inputs["kmin"][recs], inputs["kmax"][recs])
        positions, valid = select_positions(
            scores,
            inputs["rec_start"][recs],
            inputs["rec_end"][recs],
            int(inputs["seq_lens"][b]),
            int(inputs["keep_head"][b]),
            int(inputs["keep_tail_from"][b]),
            int(inputs["budgets"][b]),
        )
        counts = valid.sum(1)
        slots = torch.zeros(positions.shape[0], max_out, dtype=torch.int64)
        width = min(max_out, positions.shape[1])
        slots[:, :width] = torch.where(valid, inputs["req_slots"][b][positions], 0)[:, :width]
        want_slots.append(slots)
        want_counts.append(counts)
    return torch.stack(want_slots), torch.stack(want_counts)


# A mixed batch: one request keeps everything, one keeps nothing but head + tail, one has no
# closed block, one a tail shorter than the recent window start; ragged block counts.
MIXED = [
    Req([5, 7, 3, 9, 4, 6, 8], open_len=6, budget=100),  # budget >= seq_len: all positions
    Req([3, 9, 4, 4, 8, 5, 3, 7, 6, 9, 3], open_len=5, budget=4 + 5),  # head + tail exactly: room 0
    Req([], open_len=7, budget=7),  # only the open block: all of it is tail
    Req([6, 3, 8, 5, 9, 4, 7, 3, 3], open_len=2, budget=25, sink=2, recent=6),  # tail reaches into blocks
]
# ~40 blocks: two score tiles (BLOCK_N = 32), NB_P2 = 64, two output tiles (MAXB > BLOCK_O).
LONG = [
    Req([3 + (i * 5) % 7 for i in range(41)], open_len=9, budget=150, sink=3, recent=5),
    Req([4 + (i * 3) % 6 for i in range(17)], open_len=4, budget=40),
    Req([3 + (i * 2) % 7 for i in range(30)], open_len=3, budget=300, sink=0, recent=8),  # all kept
]
# Exact integer scores: many ties, broken by the lower block index.
TIES = [
    Req([3, 4, 3, 5, 3, 3, 6, 4, 3, 3, 5, 4], open_len=3, budget=24),
    Req([4, 4, 4, 4, 4, 4, 4, 4], open_len=4, budget=20, sink=1, recent=2),
    Req([5, 3, 9, 3, 3, 7], open_len=8, budget=18, sink=6),
]


def cases():
    ties = make_batch(TIES, integer=True, seed=2)
    ties["q"][1] = 0  # a zero query: every score of that request is exactly 0
    return {
        "mixed": (make_batch(MIXED, seed=0), 100),
        "long": (make_batch(LONG, kv_heads=2, group=3, dim=12, seed=1), 200),
        "ties": (ties, 24),
    }


CASES = cases()


@pytest.mark.parametrize("name", list(CASES))
def test_reference_matches_per_request_path(name):
    inputs, max_out = CASES[name]
    slots, counts = run(select_slots_reference, inputs, max_out, torch.int64)
    want_slots, want_counts = per_request(inputs, max_out)
    assert torch.equal(counts, want_counts) and torch.equal(slots, want_slots)
    # Exactly min(budget, seq_len) (all cases keep budget >= head + tail): the budget is filled.
    want = torch.minimum(inputs["budgets"], inputs["seq_lens"])[:, None].expand_as(counts)
    assert torch.equal(counts.to(torch.int64), want)
    if name == "mixed":
        assert counts[0].tolist() == [int(inputs["seq_lens"][0])] * 2  # everything
        assert counts[1].tolist() == [int(inputs["budgets"][1])] * 2  # exactly head + tail
        assert counts[2].tolist() == [int(inputs["seq_lens"][2])] * 2  # all of it is tail


@pytest.mark.parametrize("name", list(CASES))
def test_triton_matches_reference(name):
    inputs, max_out = CASES[name]
    want = run(select_slots_reference, inputs, max_out)
    got = run(select_slots, inputs, max_out)
    assert torch.equal(got[1], want[1]), (got[1], want[1])
    assert torch.equal(got[0], want[0])


def test_triton_scores_and_selection_from_its_own_scores():
    # The split the GPU tests rely on: scores close to score_blocks, and the selection exact given them.
    inputs, max_out = CASES["mixed"]
    scores = block_scores(inputs["q"], inputs["kmin"], inputs["kmax"], inputs["records"])
    for b in range(scores.shape[0]):
        recs = inputs["records"][b]
        n = int((recs >= 0).sum())
        want = score_blocks(inputs["q"][b], inputs["kmin"][recs[:n]], inputs["kmax"][recs[:n]])
        torch.testing.assert_close(scores[b, :, :n], want, rtol=1e-5, atol=1e-5)
        assert not scores[b, :, n:].any()  # padding columns are 0
    slots = torch.zeros(4, 2, max_out, dtype=torch.int64)
    counts = torch.zeros(4, 2, dtype=torch.int64)
    want = select_from_scores_reference(scores, *[inputs[k] for k in list(inputs)[3:]], slots, counts)
    got = run(select_slots, inputs, max_out, torch.int64)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_strided_views_and_padded_batch_rows():
    # Layer views of [L, capacity, KvH, D] record buffers, a q slice of a bigger buffer, req_slots
    # rows of a bigger req_to_token table, and a padded CUDA-graph batch row (no records, length 0).
    inputs = make_batch(MIXED[:2] + [Req([], open_len=0, budget=0, sink=0, recent=0)], seed=5)
    kmin_all = torch.randn(3, *inputs["kmin"].shape)
    kmax_all = kmin_all + 1
    kmin_all[1], kmax_all[1] = inputs["kmin"], inputs["kmax"]
    q_all = torch.randn(inputs["q"].shape[0], inputs["q"].shape[1], 2 * inputs["q"].shape[2])
    q_all[:, :, ::2] = inputs["q"]
    table = torch.zeros(inputs["req_slots"].shape[0], inputs["req_slots"].shape[1] + 10, dtype=torch.int64)
    table[:, 5 : 5 + inputs["req_slots"].shape[1]] = inputs["req_slots"]
    strided = dict(inputs, kmin=kmin_all[1], kmax=kmax_all[1], q=q_all[:, :, ::2], req_slots=table[:, 5:-5])
    assert not strided["q"].is_contiguous() and not strided["req_slots"].is_contiguous()
    want = run(select_slots_reference, inputs, 100)
    got = run(select_slots, strided, 100)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert got[1][2].tolist() == [0, 0] and not got[0][2].any()


def test_head_and_tail_over_max_out_and_no_blocks_in_batch():
    # budget < head + tail: the always-kept positions still count (as in select_positions), but
    # only MAXB slots are written; a batch with no closed block at all (NB = 0).
    reqs = [Req([], open_len=12, budget=5, sink=2, recent=3), Req([], open_len=5, budget=5)]
    inputs = make_batch(reqs, seed=7)
    assert inputs["records"].shape[1] == 0
    want = run(select_slots_reference, inputs, 8)
    got = run(select_slots, inputs, 8)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert got[1].tolist() == [[12, 12], [5, 5]]
    assert torch.equal(got[0][0, 0], inputs["req_slots"][0, :8])
    assert torch.equal(per_request(inputs, 8)[0], want[0])


# --- GPU ----------------------------------------------------------------------------------------


def serving_batch(seed, integer=False, dtype=torch.bfloat16, batch=12):
    g = torch.Generator().manual_seed(seed)
    reqs = []
    for _b in range(batch):
        nb = int(torch.randint(0, 700, (1,), generator=g))
        blocks = torch.randint(32, 97, (nb,), generator=g).tolist()
        budget = int(torch.randint(256, 4097, (1,), generator=g))
        open_len = int(torch.randint(1, 100, (1,), generator=g))
        reqs.append(Req(blocks, open_len=open_len, budget=budget, sink=4, recent=64))
    return make_batch(
        reqs, kv_heads=8, group=4, dim=128, capacity=20_000, integer=integer, seed=seed, device="cuda", dtype=dtype
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_select_slots_gpu(dtype):
    inputs = serving_batch(0, dtype=dtype)
    max_out = 4096
    # Scores agree to fp32 rounding of a 4 x 128-term sum ...
    scores = block_scores(inputs["q"], inputs["kmin"], inputs["kmax"], inputs["records"])
    for b in range(scores.shape[0]):
        recs = inputs["records"][b]
        n = int((recs >= 0).sum())
        if n:
            want = score_blocks(inputs["q"][b], inputs["kmin"][recs[:n]], inputs["kmax"][recs[:n]])
            torch.testing.assert_close(scores[b, :, :n], want, rtol=1e-5, atol=1e-4 * float(want.abs().max()))
    # ... and given those scores, the selection is exact.
    got = run(select_slots, inputs, max_out)
    ref_slots = torch.empty_like(got[0])
    ref_counts = torch.empty_like(got[1])
    want = select_from_scores_reference(scores, *[inputs[k] for k in list(inputs)[3:]], ref_slots, ref_counts)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    # Exact integer data: the whole pipeline matches the reference bit for bit.
    inputs = serving_batch(1, integer=True, dtype=dtype)
    got = run(select_slots, inputs, max_out)
    want = run(select_slots_reference, inputs, max_out)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])


@pytest.mark.gpu
def test_select_slots_cuda_graph():
    inputs = serving_batch(2, integer=True, batch=8)
    batch, kv_heads = inputs["records"].shape[0], 8
    slots = torch.empty(batch, kv_heads, 4096, dtype=torch.int64, device="cuda")
    counts = torch.empty(batch, kv_heads, dtype=torch.int32, device="cuda")
    select_slots(**inputs, slots_out=slots, counts_out=counts)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        select_slots(**inputs, slots_out=slots, counts_out=counts)
    torch.cuda.current_stream().wait_stream(stream)
    g = torch.Generator(device="cuda").manual_seed(0)
    for step in range(3):  # new queries, budgets and recent windows written in place, then replayed
        inputs["q"].copy_(torch.randint(-2, 3, inputs["q"].shape, device="cuda", generator=g))
        inputs["budgets"].copy_(torch.randint(64, 4097, (batch,), device="cuda", generator=g))
        inputs["keep_tail_from"].sub_(step)  # stays >= the open block's start - 2
        inputs["keep_tail_from"].clamp_(min=0)
        graph.replay()
        want = run(select_slots_reference, inputs, 4096)
        torch.cuda.synchronize()
        assert torch.equal(counts, want[1]) and torch.equal(slots, want[0]), step


# --- compile check without a GPU ------------------------------------------------------------------

COMPILE_SCRIPT = """
from dynsplit_sglang.kernels import block_select_triton as m

INDEX = ["records_ptr", "rec_start_ptr", "rec_end_ptr", "seq_lens_ptr", "keep_head_ptr",
         "keep_tail_from_ptr", "budgets_ptr", "incl_ptr", "shift_ptr", "req_slots_ptr", "out_ptr"]

def signature(fn, ptrs, constexprs):
    # Pointers by name, constexprs by name, every other (stride / size) argument i64.
    types = {**{n: "*i64" for n in INDEX}, **ptrs}
    sig = {n: "constexpr" if n in constexprs else types.get(n, "i64") for n in fn.arg_names}
    assert all(t[0] == "*" for n, t in sig.items() if n.endswith("_ptr")), sig
    return sig

for dt in ("bf16", "fp16", "fp32"):
    keys = {"q_ptr": f"*{dt}", "kmin_ptr": f"*{dt}", "kmax_ptr": f"*{dt}", "scores_ptr": "*fp32"}
    c = {"BLOCK_G": 8, "BLOCK_N": m.BLOCK_N, "BLOCK_D": 128}
    lower(m._block_scores_kernel, signature(m._block_scores_kernel, keys, c), c)
for nb_p2 in (64, 4096):  # the test size and a ~200k-token context of 48-token blocks
    c = {"NB_P2": nb_p2}
    lower(m._choose_blocks_kernel, signature(m._choose_blocks_kernel, {"scores_ptr": "*fp32", "counts_ptr": "*i32"}, c),
          c, m._choose_warps(nb_p2))
c = {"BLOCK_O": m.BLOCK_O, "SEARCH_STEPS": 13}
lower(m._expand_kernel, signature(m._expand_kernel, {"counts_ptr": "*i32"}, c), c)
"""


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("name", ["dynsplit", "fixed", "quest"])
def test_policy_gpu_selection_is_its_torch_selection(name, device):
    """DynSplitPolicy / QuestPolicy.select_slots_batch with the GPU selection on ($DYNSPLIT_SELECTION=triton)
    against the same policy's torch path, as the backend calls them: a decode batch of three
    requests at different lengths and budgets, every layer. Small integer keys and queries make
    every score exact, so the two agree exactly (ties included). No SGLang import (the GPU box
    runs the cuda case)."""
    from dynsplit_sglang.block_table import ModelShape
    from dynsplit_sglang.decode_step import Selecting
    from dynsplit_sglang.policies import RequestView
    from tests.test_selection import decode_time_policy

    shape = ModelShape(num_layers=4, num_heads=4, num_kv_heads=2, head_dim=8)
    policy = decode_time_policy(name, shape, 256, device)
    g = torch.Generator().manual_seed(7)
    keys = torch.randint(-3, 4, (256, shape.num_kv_heads, shape.head_dim), generator=g).float().to(device)
    lens, budgets, starts = [100, 70, 75], [64, 64, 72], [0, 101, 172]
    rows = [torch.arange(s, s + n + 1, device=device) for s, n in zip(starts, lens)]  # prompt + one decode slot
    ids = [torch.zeros(n, dtype=torch.int64, device=device) for n in lens]
    reqs = [RequestView(r[:n], 0, i, f"r{k}", k, b) for k, (r, n, i, b) in enumerate(zip(rows, lens, ids, budgets))]
    policy.begin_forward(reqs, False)
    policy.end_forward(reqs, [keys] * shape.num_layers)
    one = torch.zeros(1, dtype=torch.int64, device=device)
    reqs = [RequestView(r, n, one, f"r{k}", k, b) for k, (r, n, b) in enumerate(zip(rows, lens, budgets))]
    policy.begin_forward(reqs, True)
    req_slots = torch.zeros(3, max(lens) + 1, dtype=torch.int64, device=device)
    for k, r in enumerate(rows):
        req_slots[k, : r.numel()] = r
    order = [2, 0, 1]
    sel = Selecting.of(tuple(order), req_slots)
    for layer in range(shape.num_layers):
        q = torch.randint(-3, 4, (3, shape.num_heads, shape.head_dim), generator=g).float().to(device)
        want, want_valid = policy.select_slots_batch(layer, sel, q)
        policy.use_gpu_selection(True)
        got, got_valid = policy.select_slots_batch(layer, sel, q)
        policy.use_gpu_selection(False)
        assert got_valid.sum(-1).tolist() == [[min(budgets[i], lens[i] + 1)] * shape.num_kv_heads for i in order]
        assert policy.selection_counts(layer, order) == [min(budgets[i], lens[i] + 1) for i in order]
        assert torch.equal(got_valid.sum(-1), want_valid.sum(-1))
        width = want.shape[2]
        assert torch.equal(got[:, :, :width][got_valid[:, :, :width]], want[want_valid])
    policy.end_forward(reqs, [keys] * shape.num_layers)


def test_kernels_lower_to_sm90_without_a_gpu():
    stdout = lower_in_subprocess(COMPILE_SCRIPT)
    assert stdout.count(" ok") == 6, stdout
