"""FlashInfer sparse decode with KV heads folded into the batch (dynsplit_sglang/sparse_decode_flashinfer.py).

On CPU a torch stand-in with FlashInfer's plan/run contract (`dynsplit_sglang/testing/fake_flashinfer.py`)
checks the folding, the per-step plan and the in-place per-layer index writes against the torch
path's `sparse_decode_attention`. The stand-in keeps what FlashInfer's fa2 decode wrapper keeps:
in eager mode a reference to the indices tensor given to plan (so later in-place writes are seen),
in CUDA-graph mode its own preallocated buffers (copied into at plan); and it returns a base-2 lse
like FlashInfer. `-m gpu` runs the real wrapper, eager and replayed from a captured CUDA graph, in
bf16, against the same torch path.
"""

import pytest
import torch

from dynsplit_sglang.gpu_path import selection_kernel, sparse_attention_op
from dynsplit_sglang.kernels.block_select_triton import select_slots_reference
from dynsplit_sglang.kernels.sparse_attention import sparse_decode_attention, sparse_decode_attention_batched
from dynsplit_sglang.sparse_decode_flashinfer import FlashInferSparseAttention, FoldedSparseDecode, flashinfer_wrapper
from dynsplit_sglang.testing.fake_flashinfer import FakeDecodeWrapper


def fake(use_cuda_graph):
    def make(sparse):
        if use_cuda_graph:
            return FakeDecodeWrapper(True, sparse.indptr, sparse.indices, sparse.last_page_len)
        return FakeDecodeWrapper()

    return make


def random_selection(batch, kv_heads, width, counts, num_slots, g):
    """[B, KvH, width] distinct slots per row, the first counts[b] valid, garbage after."""
    slots = torch.randint(0, num_slots, (batch, kv_heads, width), generator=g)
    for b, c in enumerate(counts):
        for h in range(kv_heads):
            slots[b, h, :c] = torch.randperm(num_slots, generator=g)[:c]
    return slots


def reference(q, keys, values, slots, counts, scale):
    """out [B, H, D], natural-log lse [B, H] of q [B, H, D] over the first counts[b] of slots [B, KvH, W]."""
    outs, lses = [], []
    for b, c in enumerate(counts):
        valid = torch.ones(slots.shape[1], c, dtype=torch.bool)
        o, lse = sparse_decode_attention(q[b], keys, values, slots[b, :, :c], valid, scale)
        outs.append(o)
        lses.append(lse)
    return torch.stack(outs), torch.stack(lses)


def attend_and_check(sparse, q, keys, values, slots, counts, scale):
    """Write one layer's selection, attend, and compare with the torch path (fp32)."""
    sparse.write_indices(slots)
    out, lse = sparse.run(q, keys, values)
    want_out, want_lse = reference(q, keys, values, slots, counts, scale)
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)  # natural log, like the torch path


@pytest.mark.parametrize("use_cuda_graph", [False, True])
def test_one_plan_serves_every_layer_with_in_place_index_writes(use_cuda_graph):
    g = torch.Generator().manual_seed(0)
    kv_heads, group, dim, num_slots, scale = 3, 2, 16, 400, 0.25
    counts, width = [37, 5, 64, 1], 64
    batch = len(counts)
    sparse = FoldedSparseDecode(
        fake(use_cuda_graph), kv_heads, group, dim, max_requests=batch, max_out=width, device="cpu"
    )
    sparse.plan(counts, width, torch.float32, torch.float32, scale)
    assert sparse.wrapper.num_kv_heads == 1  # one KV head per folded row
    for _layer in range(3):  # every layer its own KV, queries and selection, one plan
        keys, values = torch.randn(2, num_slots, kv_heads, dim, generator=g)
        q = torch.randn(batch, kv_heads * group, dim, generator=g)
        slots = random_selection(batch, kv_heads, width, counts, num_slots, g)
        attend_and_check(sparse, q, keys, values, slots, counts, scale)
    assert sparse.wrapper.plans == 1


def test_smaller_batch_and_width_than_the_buffers():
    g = torch.Generator().manual_seed(1)
    sparse = FoldedSparseDecode(fake(False), 2, 4, 8, max_requests=6, max_out=100, device="cpu")
    for counts, width in (([9, 20], 20), ([3, 3, 3], 7)):  # two steps, two plans
        sparse.plan(counts, width, torch.float32, torch.float32, 0.5)
        keys, values = torch.randn(2, 50, 2, 8, generator=g)
        q = torch.randn(len(counts), 8, 8, generator=g)
        slots = random_selection(len(counts), 2, width, counts, 50, g)
        attend_and_check(sparse, q, keys, values, slots, counts, 0.5)


def test_selection_kernel_output_feeds_the_index_list():
    """select_slots' [B, KvH, MAXB] buffer with a fixed per-request count per step goes in as it is."""
    g = torch.Generator().manual_seed(2)
    kv_heads, group, dim, num_slots = 2, 2, 8, 300
    # Two requests: 6 closed blocks of 10 + an open tail of 5 (seq_len 65), 3 blocks + 2 (32).
    starts = [torch.arange(0, 60, 10), torch.arange(0, 30, 10)]
    capacity = 9
    rec_start = torch.cat(starts)
    rec_end = rec_start + 9
    records = torch.tensor([[0, 1, 2, 3, 4, 5], [6, 7, 8, -1, -1, -1]])
    seq_lens = torch.tensor([65, 32])
    req_slots = torch.stack([torch.randperm(num_slots, generator=g)[:65] for _ in range(2)])
    kmin, kmax = torch.randn(2, capacity, kv_heads, dim, generator=g)
    q = torch.randn(2, kv_heads * group, dim, generator=g)
    budgets = torch.tensor([24, 64])  # request 1 is shorter than its budget: all 32 positions
    keep_head, keep_tail_from = torch.tensor([2, 2]), torch.tensor([60, 30])
    width = 32
    slots = torch.empty(2, kv_heads, width, dtype=torch.int64)
    got_counts = torch.empty(2, kv_heads, dtype=torch.int64)
    select_slots_reference(
        q,
        kmin.view(capacity, kv_heads, dim),
        kmax.view(capacity, kv_heads, dim),
        records,
        rec_start,
        rec_end,
        req_slots,
        seq_lens,
        keep_head,
        keep_tail_from,
        budgets,
        slots,
        got_counts,
    )
    counts = torch.minimum(budgets, seq_lens).tolist()
    assert got_counts.tolist() == [[c] * kv_heads for c in counts]  # the budget is filled exactly
    sparse = FoldedSparseDecode(fake(False), kv_heads, group, dim, max_requests=2, max_out=width, device="cpu")
    sparse.plan(counts, width, torch.float32, torch.float32, 0.3)
    keys, values = torch.randn(2, num_slots, kv_heads, dim, generator=g)
    attend_and_check(sparse, q, keys, values, slots, counts, 0.3)


def test_graph_mode_plans_the_fixed_batch_and_width_only():
    sparse = FoldedSparseDecode(fake(True), 2, 2, 8, max_requests=3, max_out=16, device="cpu")
    with pytest.raises(ValueError, match="exactly 3 requests of 16 slots, got 2 of 16"):
        sparse.plan([4, 4], 16, torch.float32, torch.float32, 1.0)
    with pytest.raises(ValueError, match="exactly 3 requests of 16 slots, got 3 of 8"):
        sparse.plan([4, 4, 4], 8, torch.float32, torch.float32, 1.0)
    sparse.plan([4, 16, 1], 16, torch.float32, torch.float32, 1.0)


def test_plan_rejects_counts_outside_the_buffers():
    sparse = FoldedSparseDecode(fake(False), 2, 2, 8, max_requests=2, max_out=16, device="cpu")
    with pytest.raises(ValueError, match="2 requests of 16 slots"):
        sparse.plan([4, 4, 4], 16, torch.float32, torch.float32, 1.0)
    with pytest.raises(ValueError, match="2 requests of 16 slots"):
        sparse.plan([4], 17, torch.float32, torch.float32, 1.0)
    with pytest.raises(ValueError, match=r"every count must be in \[1, 8\]"):
        sparse.plan([9, 4], 8, torch.float32, torch.float32, 1.0)
    with pytest.raises(ValueError, match=r"every count must be in \[1, 8\]"):
        sparse.plan([0, 4], 8, torch.float32, torch.float32, 1.0)


# --- the server's sparse attention op on FlashInfer ----------------------------------------------------


def selection_with_valid(counts, kv_heads, width, num_slots, g, head_counts=None):
    """slots [R, KvH, width] and valid (the first counts[r] of each row, or head_counts[r][h])."""
    slots = random_selection(len(counts), kv_heads, width, counts, num_slots, g)
    per_head = head_counts or [[c] * kv_heads for c in counts]
    valid = torch.arange(width)[None, None, :] < torch.tensor(per_head)[:, :, None]
    return slots, valid


def test_server_op_is_the_torch_op_and_plans_only_when_counts_change():
    g = torch.Generator().manual_seed(3)
    kv_heads, group, dim, num_slots, scale = 2, 3, 16, 3000, 0.3
    op = FlashInferSparseAttention(fake(False), kv_heads, group, dim, "cpu")
    keys, values = torch.randn(2, num_slots, kv_heads, dim, generator=g)
    steps = [
        ([30, 7, 64], 64),  # first step: one plan for every layer
        ([30, 7, 64], 64),  # same counts next step: the plan is reused
        ([31, 8, 64], 64),  # the counts grew: plan again
        ([5, 700, 9, 9, 9, 9], 700),  # more requests, wider: bigger buffers, plan again
    ]
    for counts, width in steps:
        for layer in range(3):
            q = torch.randn(len(counts), kv_heads * group, dim, generator=g)
            slots, valid = selection_with_valid(counts, kv_heads, width, num_slots, g)
            # the counts from the host (as the FlashInfer backend gives them) or read from valid
            out, lse = op(q, keys, values, slots, valid, scale, counts=counts if layer % 2 else None)
            want_out, want_lse = sparse_decode_attention_batched(q, keys, values, slots, valid, scale)
            torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)
    assert op.plans == 3
    assert op.sparse.max_requests >= 6 and op.sparse.max_out >= 700
    # KV heads of one request keeping different counts: the torch op answers, nothing is planned
    slots, valid = selection_with_valid([10, 4], kv_heads, 12, num_slots, g, head_counts=[[10, 12], [4, 4]])
    q = torch.randn(2, kv_heads * group, dim, generator=g)
    out, _ = op(q, keys, values, slots, valid, scale)
    torch.testing.assert_close(out, sparse_decode_attention_batched(q, keys, values, slots, valid, scale)[0])
    assert op.plans == 3


def test_server_op_choice_and_its_errors():
    name, op = sparse_attention_op("cpu", 2, 2, 8, env={})
    assert name == "torch" and op is sparse_decode_attention_batched
    assert sparse_attention_op("cpu", 2, 2, 8, env={"DYNSPLIT_SPARSE_ATTENTION": " Torch "})[0] == "torch"
    with pytest.raises(
        ValueError, match=r"\$DYNSPLIT_SPARSE_ATTENTION='cuda': valid values are 'torch' and 'flashinfer'"
    ):
        sparse_attention_op("cpu", 2, 2, 8, env={"DYNSPLIT_SPARSE_ATTENTION": "cuda"})
    with pytest.raises(ValueError, match="flashinfer needs a CUDA device; this server runs on cpu"):
        sparse_attention_op("cpu", 2, 2, 8, env={"DYNSPLIT_SPARSE_ATTENTION": "flashinfer"})
    assert selection_kernel("cpu", env={}) == "torch"
    with pytest.raises(ValueError, match=r"\$DYNSPLIT_SELECTION='cuda': valid values are 'torch' and 'triton'"):
        selection_kernel("cpu", env={"DYNSPLIT_SELECTION": "cuda"})
    with pytest.raises(ValueError, match=r"\$DYNSPLIT_SELECTION=triton needs a CUDA device"):
        selection_kernel("cpu", env={"DYNSPLIT_SELECTION": "triton"})


# --- GPU: the real FlashInfer wrapper ---------------------------------------------------------------


def gpu_case(seed, batch=8, kv_heads=8, group=4, dim=128, num_slots=40_000, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 2049, (batch,), generator=g).tolist()
    width = 2048
    keys, values = torch.randn(2, num_slots, kv_heads, dim, generator=g).to("cuda", dtype)
    q = torch.randn(batch, kv_heads * group, dim, generator=g).to("cuda", dtype)
    slots = random_selection(batch, kv_heads, width, counts, num_slots, g).cuda()
    return counts, width, keys, values, q, slots


@pytest.mark.gpu
def test_flashinfer_sparse_decode_matches_the_torch_path():
    counts, width, keys, values, q, slots = gpu_case(0)
    workspace = torch.zeros(128 << 20, dtype=torch.uint8, device="cuda")
    sparse = FoldedSparseDecode(
        flashinfer_wrapper(workspace, use_cuda_graph=False),
        8,
        4,
        128,
        max_requests=len(counts),
        max_out=width,
        device="cuda",
    )
    sparse.plan(counts, width, q.dtype, keys.dtype, 128**-0.5)
    for layer in range(2):  # the second layer rewrites the indices in place under the same plan
        if layer:
            slots = random_selection(
                len(counts), 8, width, counts, keys.shape[0], torch.Generator().manual_seed(9)
            ).cuda()
        sparse.write_indices(slots)
        out, lse = sparse.run(q, keys, values)
        want_out, want_lse = reference(
            q.float().cpu(), keys.float().cpu(), values.float().cpu(), slots.cpu(), counts, 128**-0.5
        )
        torch.testing.assert_close(out.float().cpu(), want_out, rtol=2e-2, atol=2e-2)  # bf16 P.V
        torch.testing.assert_close(lse.cpu(), want_lse, rtol=1e-3, atol=1e-2)


@pytest.mark.gpu
def test_flashinfer_sparse_decode_cuda_graph_replay():
    counts, width, keys, values, q, slots = gpu_case(1)
    batch = len(counts)
    workspace = torch.zeros(128 << 20, dtype=torch.uint8, device="cuda")
    sparse = FoldedSparseDecode(
        flashinfer_wrapper(workspace, use_cuda_graph=True), 8, 4, 128, max_requests=batch, max_out=width, device="cuda"
    )
    sparse.plan(counts, width, q.dtype, keys.dtype, 128**-0.5)
    static_slots = slots.clone()
    sparse.write_indices(static_slots)
    sparse.run(q, keys, values)  # warm up (JIT) outside the capture
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        sparse.write_indices(static_slots)
        out, lse = sparse.run(q, keys, values)
    torch.cuda.current_stream().wait_stream(stream)
    g = torch.Generator().manual_seed(5)
    for _step in range(2):  # new selection and queries written in place, then replayed
        static_slots.copy_(random_selection(batch, 8, width, counts, keys.shape[0], g))
        q.copy_(torch.randn(q.shape, generator=g).to(q))
        graph.replay()
        sparse.write_indices(static_slots)
        want_out, want_lse = sparse.run(q, keys, values)  # eager, same plan
        torch.cuda.synchronize()
        torch.testing.assert_close(out, want_out, rtol=0, atol=0)
        torch.testing.assert_close(lse, want_lse, rtol=0, atol=0)


@pytest.mark.gpu
def test_server_op_on_flashinfer_matches_the_torch_op():
    name, op = sparse_attention_op("cuda", 8, 4, 128, env={"DYNSPLIT_SPARSE_ATTENTION": "flashinfer"})
    assert name == "flashinfer"
    g = torch.Generator().manual_seed(4)
    keys, values = torch.randn(2, 40_000, 8, 128, generator=g).to("cuda", torch.bfloat16)
    for counts in ([4096, 4096, 1000, 77], [4096, 4096, 1001, 78]):  # two steps, two layers each
        for _layer in range(2):
            q = torch.randn(len(counts), 32, 128, generator=g).to("cuda", torch.bfloat16)
            slots, valid = selection_with_valid(counts, 8, 4096, keys.shape[0], g)
            slots, valid = slots.cuda(), valid.cuda()
            out, lse = op(q, keys, values, slots, valid, 128**-0.5)
            want_out, want_lse = sparse_decode_attention_batched(q, keys, values, slots, valid, 128**-0.5)
            torch.testing.assert_close(out.float(), want_out.float(), rtol=2e-2, atol=2e-2)
            torch.testing.assert_close(lse, want_lse, rtol=1e-3, atol=1e-2)
    assert op.plans == 2
