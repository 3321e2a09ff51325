"""Triton DD-Select band rows vs the torch reference.

On CPU the kernel runs in the Triton interpreter (conftest sets TRITON_INTERPRET=1 before it is
imported): fp32, small shapes. `-m gpu` runs bf16/fp16 on prefill-sized shapes. The compile check
lowers the kernel to sm_90 PTX/cubin without a GPU, in a subprocess.
"""

import pytest
import torch

from dynsplit_sglang.kernels.dd_select import dd_band_rows, row_lse
from dynsplit_sglang.kernels.dd_select_triton import dd_band_rows_from_lse, dd_band_rows_from_lse_reference
from tests.sm90 import lower_in_subprocess


def make_inputs(n, q_start, heads, kv_heads, dim, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(n, heads, dim, generator=g, device=device).to(dtype)
    k = torch.randn(q_start + n, kv_heads, dim, generator=g, device=device).to(dtype)
    lse = row_lse(q, k, q_start, dim**-0.5)  # [H, n], what the prefill kernel would return
    return q, k, lse


@pytest.mark.parametrize(
    "n,q_start,heads,kv_heads,dim,lookahead,local_window,head_subset",
    [
        (20, 0, 4, 2, 12, 5, 6, None),  # first chunk: bands cut off at position 0; D not a power of 2
        (7, 30, 4, 1, 16, 3, 0, [3, 0]),  # later chunk, n < W, no local window, a head subset (MQA)
        (37, 5, 2, 2, 8, 8, 16, None),  # the default L, R; n spans three programs
        (1, 0, 2, 1, 8, 1, 0, None),  # a single query at position 0
    ],
)
def test_kernel_matches_reference(n, q_start, heads, kv_heads, dim, lookahead, local_window, head_subset):
    q, k, lse = make_inputs(n, q_start, heads, kv_heads, dim)
    subset = None if head_subset is None else torch.tensor(head_subset)
    args = (q, k, q_start, dim**-0.5, lookahead, local_window, 0.7, lse, subset)
    got = dd_band_rows_from_lse(*args)
    want = dd_band_rows_from_lse_reference(*args)
    assert got.shape == (n, lookahead) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_lse_with_any_strides_and_empty_query_set():
    # FlashInfer returns lse as [n, H]; its transpose must work without a copy.
    q, k, lse = make_inputs(9, 3, 4, 2, 8)
    got = dd_band_rows_from_lse(q, k, 3, 8**-0.5, 4, 4, 1.0, lse.t().contiguous().t())
    torch.testing.assert_close(
        got, dd_band_rows_from_lse_reference(q, k, 3, 8**-0.5, 4, 4, 1.0, lse), atol=1e-5, rtol=0
    )
    q, k, lse = torch.randn(0, 4, 8), torch.randn(4, 2, 8), torch.empty(4, 0)
    for fn in (dd_band_rows_from_lse, dd_band_rows_from_lse_reference):
        assert fn(q, k, 4, 8**-0.5, 4, 4, 1.0, lse).shape == (0, 4)


def test_reference_equals_dd_band_rows():
    q, k, lse = make_inputs(50, 11, 4, 2, 8, seed=3)
    heads = torch.tensor([1, 2])
    for subset in (None, heads):  # lse always has every head; a subset picks its rows
        got = dd_band_rows_from_lse_reference(q, k, 11, 8**-0.5, 6, 5, 0.5, lse, subset)
        want = dd_band_rows(q, k, 11, 8**-0.5, 6, 5, 0.5, subset)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


# --- GPU ----------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("q_start", [0, 3001])
def test_kernel_matches_reference_gpu(dtype, q_start):
    # Both sides upcast the same bf16/fp16 inputs to fp32, so only the summation order differs:
    # the logits differ by ~1e-6 relative, the rows (sums of <= W probabilities) by far less
    # than 1e-4, well under DD-Select's SCORE_QUANTUM of 1/1024.
    n, heads, kv_heads, dim = 4000, 32, 8, 128
    q, k, lse = make_inputs(n, q_start, heads, kv_heads, dim, dtype, "cuda")
    for subset in (None, torch.tensor([0, 5, 17, 31], device="cuda")):
        args = (q, k, q_start, dim**-0.5, 8, 16, 1.0, lse, subset)
        torch.testing.assert_close(
            dd_band_rows_from_lse(*args), dd_band_rows_from_lse_reference(*args), atol=1e-4, rtol=0
        )


# --- compile check without a GPU ------------------------------------------------------------------

COMPILE_SCRIPT = """
import triton
from dynsplit_sglang.kernels import dd_select_triton as m

fn = m._dd_band_rows_kernel
W = 8 + 16  # the default lookahead + local_window
# fp16 lowers like bf16 (both are cast to fp32 right after the load); ~3 s per variant.
for dt, has_heads in (("bf16", False), ("bf16", True), ("fp32", True)):
    types = [f"*{dt}", f"*{dt}", "*fp32", "*i64", "*fp32"] + ["i32"] * 6 + ["i64"] * 10 + ["fp32"] * 2
    types += ["constexpr"] * 7
    constexprs = {"LOOKAHEAD": 8, "LOCAL": 16, "HAS_HEADS": has_heads, "BLOCK_N": m.BLOCK_N,
                  "BLOCK_K": triton.next_power_of_2(m.BLOCK_N + W - 1), "BLOCK_D": m.BLOCK_D, "BLOCK_L": 8}
    lower(fn, dict(zip(fn.arg_names, types)), constexprs, m.NUM_WARPS, name=f"{dt} {has_heads}")
"""


def test_kernel_lowers_to_sm90_without_a_gpu():
    stdout = lower_in_subprocess(COMPILE_SCRIPT)
    assert stdout.count(" ok") == 3
