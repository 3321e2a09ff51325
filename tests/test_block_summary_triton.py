"""Triton block-summary kernels vs their torch references.

On CPU the kernels run in the Triton interpreter (conftest sets TRITON_INTERPRET=1 before they are
imported): fp32, small shapes. `-m gpu` runs bf16/fp16 on bigger shapes and a CUDA-graph replay.
The compile check lowers the kernels to sm_90 PTX/cubin without a GPU, in a subprocess.
"""

import pytest
import torch

from dynsplit_sglang.kernels.block_summary import block_min_max
from dynsplit_sglang.kernels.block_summary_triton import (
    build_summaries,
    build_summaries_reference,
    update_open_summaries,
    update_open_summaries_reference,
)
from tests.sm90 import lower_in_subprocess


def random_blocks(lengths, num_slots, capacity, seed, pad=-1):
    """Blocks on random distinct slots (padded with `pad`) and distinct random record ids."""
    g = torch.Generator().manual_seed(seed)
    nb, width = len(lengths), max(lengths, default=1)
    slots = torch.full((nb, width), pad, dtype=torch.int64)
    perm = torch.randperm(num_slots, generator=g)
    start = 0
    for b, n in enumerate(lengths):
        slots[b, :n] = perm[start : start + n]
        start += n
    records = torch.randperm(capacity, generator=g)[:nb]
    return slots, torch.tensor(lengths, dtype=torch.int64), records


def record_buffers(capacity, kv_heads, dim, dtype=torch.float32, device="cpu"):
    # Non-zero garbage, so a record the kernel should not touch (or should overwrite) shows.
    kmin = torch.randn(capacity, kv_heads, dim, device=device).to(dtype)
    return kmin, kmin + 1


def both(fn, ref, before, kmin, kmax, after=()):
    """Run the Triton op and the reference on copies of the record buffers:
    fn(*before, kmin, kmax, *after)."""
    a, b = (kmin.clone(), kmax.clone()), (kmin.clone(), kmax.clone())
    fn(*before, *a, *after)
    ref(*before, *b, *after)
    return a, b


@pytest.mark.parametrize(
    "lengths,kv_heads,dim",
    [
        ([1, 5, 33, 3], 2, 12),  # a length-1 block, a block over one BLOCK_P tile, D not a power of 2
        ([7], 1, 16),
        ([], 2, 8),  # nothing closed in this batch
    ],
)
def test_build_summaries_matches_reference(lengths, kv_heads, dim):
    keys = torch.randn(80, kv_heads, dim)
    slots, lens, records = random_blocks(lengths, 80, 12, seed=len(lengths))
    kmin, kmax = record_buffers(12, kv_heads, dim)
    (a_min, a_max), (b_min, b_max) = both(
        build_summaries, build_summaries_reference, (keys, slots, lens, records), kmin, kmax
    )
    assert torch.equal(a_min, b_min) and torch.equal(a_max, b_max)
    untouched = torch.ones(12, dtype=torch.bool)
    untouched[records] = False
    assert torch.equal(a_min[untouched], kmin[untouched]) and torch.equal(a_max[untouched], kmax[untouched])


def test_build_summaries_on_strided_layer_views():
    # The block table passes kmin[layer] views of [layers, capacity, KvH, D] buffers, and keys may
    # be a view of a bigger KV buffer.
    kv = torch.randn(40, 2, 3, 8)  # [slots, k/v, KvH, D]
    keys = kv[:, 0]
    slots, lens, records = random_blocks([4, 9], 40, 6, seed=3)
    kmin_all, kmax_all = torch.zeros(2, 6, 3, 8), torch.zeros(2, 6, 3, 8)
    build_summaries(keys, slots, lens, records, kmin_all[1], kmax_all[1])
    want_min, want_max = block_min_max(keys, slots.clamp_min(0), lens)
    assert torch.equal(kmin_all[1, records], want_min) and torch.equal(kmax_all[1, records], want_max)
    assert not kmin_all[0].any()


def test_build_reference_equals_block_min_max():
    keys = torch.randn(60, 2, 8, dtype=torch.float16)
    # Pad with each block's last slot, like BlockTable.add_blocks does, so block_min_max can read it.
    slots, lens, records = random_blocks([3, 1, 20], 60, 8, seed=5)
    slots = torch.where(slots >= 0, slots, slots.gather(1, (lens - 1)[:, None]))
    kmin, kmax = torch.zeros(8, 2, 8, dtype=torch.float16), torch.zeros(8, 2, 8, dtype=torch.float16)
    build_summaries_reference(keys, slots, lens, records, kmin, kmax)
    want_min, want_max = block_min_max(keys, slots, lens)
    assert torch.equal(kmin[records], want_min) and torch.equal(kmax[records], want_max)


def test_update_open_summaries_matches_reference():
    keys = torch.randn(30, 2, 12)
    new_slots = torch.tensor([4, 9, 11, 0, 29])
    records = torch.tensor([2, -1, 5, 0, 7])  # -1: a padded batch row, must be skipped
    reset = torch.tensor([True, False, False, True, False])
    kmin, kmax = record_buffers(8, 2, 12)
    (a_min, a_max), (b_min, b_max) = both(
        update_open_summaries, update_open_summaries_reference, (keys, new_slots, records), kmin, kmax, (reset,)
    )
    assert torch.equal(a_min, b_min) and torch.equal(a_max, b_max)
    assert torch.equal(a_min[0], keys[0]) and torch.equal(a_max[2], keys[4])  # reset rows are the key
    for r in (1, 3, 4, 6):  # records no live row points at
        assert torch.equal(a_min[r], kmin[r])
    # Empty batch: nothing to do, nothing launched.
    empty = torch.empty(0, dtype=torch.int64)
    update_open_summaries(keys, empty, empty, a_min, a_max, torch.empty(0, dtype=torch.bool))
    assert torch.equal(a_min, b_min)


def test_folding_tokens_one_by_one_builds_the_block_summary():
    # Decode appends: reset on a block's first token, then fold; the result is block_min_max.
    keys = torch.randn(40, 2, 8)
    seq = torch.randperm(40)[:6].view(6, 1)  # 6 steps of a batch of 2 requests ...
    seq = torch.cat([seq, torch.randperm(40)[:6].view(6, 1)], 1)
    records = torch.tensor([3, 1])
    for fn in (update_open_summaries, update_open_summaries_reference):
        kmin, kmax = record_buffers(4, 2, 8)
        for step in range(6):
            fn(keys, seq[step], records, kmin, kmax, torch.full((2,), step == 0))
        want_min, want_max = block_min_max(keys, seq.t().contiguous(), torch.tensor([6, 6]))
        assert torch.equal(kmin[records], want_min) and torch.equal(kmax[records], want_max)


# --- GPU ----------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_build_summaries_gpu(dtype):
    # min/max never rounds: exact in any dtype.
    torch.manual_seed(0)
    lengths = torch.randint(1, 400, (300,)).tolist()
    keys = torch.randn(200_000, 8, 128, device="cuda").to(dtype)
    slots, lens, records = random_blocks(lengths, 200_000, 4096, seed=0)
    slots, lens, records = slots.cuda(), lens.cuda(), records.cuda()
    kmin, kmax = record_buffers(4096, 8, 128, dtype, "cuda")
    (a_min, a_max), (b_min, b_max) = both(
        build_summaries, build_summaries_reference, (keys, slots, lens, records), kmin, kmax
    )
    assert torch.equal(a_min, b_min) and torch.equal(a_max, b_max)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_update_open_summaries_gpu_and_cuda_graph(dtype):
    torch.manual_seed(0)
    batch, capacity = 64, 1024
    keys = torch.randn(50_000, 8, 128, device="cuda").to(dtype)
    kmin, kmax = record_buffers(capacity, 8, 128, dtype, "cuda")
    new_slots = torch.randint(0, 50_000, (batch,), device="cuda")
    records = torch.randperm(capacity, device="cuda")[:batch]
    records[-5:] = -1  # padded rows of the captured batch size
    reset = torch.rand(batch, device="cuda") < 0.2
    ref_min, ref_max = kmin.clone(), kmax.clone()

    update_open_summaries(keys, new_slots, records, kmin, kmax, reset)  # compile outside the capture
    update_open_summaries_reference(keys, new_slots, records, ref_min, ref_max, reset)
    assert torch.equal(kmin, ref_min) and torch.equal(kmax, ref_max)

    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        update_open_summaries(keys, new_slots, records, kmin, kmax, reset)
    torch.cuda.current_stream().wait_stream(stream)
    for step in range(3):  # new inputs written in place, then replayed
        new_slots.copy_(torch.randint(0, 50_000, (batch,), device="cuda"))
        reset.copy_(torch.rand(batch, device="cuda") < 0.2)
        graph.replay()
        update_open_summaries_reference(keys, new_slots, records, ref_min, ref_max, reset)
        torch.cuda.synchronize()
        assert torch.equal(kmin, ref_min) and torch.equal(kmax, ref_max), step


# --- compile check without a GPU ------------------------------------------------------------------

COMPILE_SCRIPT = """
from dynsplit_sglang.kernels import block_summary_triton as m

for dt in ("bf16", "fp16", "fp32"):
    fn = m._build_summaries_kernel
    types = [f"*{dt}", "*i64", "*i64", "*i64", f"*{dt}", f"*{dt}"] + ["i64"] * 8 + ["i32"] + ["constexpr"] * 2
    lower(fn, dict(zip(fn.arg_names, types)), {"BLOCK_P": m.BLOCK_P, "BLOCK_D": 128}, name=fn.__name__)
    fn = m._update_open_summaries_kernel
    types = [f"*{dt}", "*i64", "*i64", "*i1", f"*{dt}", f"*{dt}"] + ["i64"] * 6 + ["i32"] * 2 + ["constexpr"] * 2
    lower(fn, dict(zip(fn.arg_names, types)), {"BLOCK_H": 8, "BLOCK_D": 128}, name=fn.__name__)
"""


def test_kernels_lower_to_sm90_without_a_gpu():
    stdout = lower_in_subprocess(COMPILE_SCRIPT)
    assert stdout.count(" ok") == 6
