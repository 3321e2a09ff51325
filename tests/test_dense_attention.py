"""`attention_with_lse` (the prefill kernel call that also returns the lse) against the plain
formula, on the CPU and on a GPU. No SGLang import: the GPU box runs this file."""

import pytest
import torch

from dynsplit_sglang.kernels.dense_attention import (
    attention_with_lse,
    attention_with_lse_formula,
    sliding_window_attention,
    window_slots,
)


@pytest.mark.parametrize("causal", [True, False])
def test_cpu_kernel_matches_the_formula(causal):
    """The CPU flash kernel (out and lse) against the plain formula the other devices use;
    2100 queries cross the formula's 1024-query chunks."""
    torch.manual_seed(1)
    n = 2100
    q, k, v = (
        torch.randn(1, 9, n, 64),
        torch.randn(1, 3, n if causal else 700, 64),
        torch.randn(1, 3, n if causal else 700, 64),
    )
    out, lse = attention_with_lse(q, k, v, 0.125, causal)
    want_out, want_lse = attention_with_lse_formula(q, k, v, 0.125, causal)
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=2e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [True, False])
def test_cuda_flash_kernel_matches_the_formula(dtype, causal):
    """On a GPU the prefill lse comes from SDPA's FlashAttention-2 kernel: out and the
    natural-log lse against the fp32 formula on the same half-precision inputs."""
    torch.manual_seed(2)
    n, t = 1500, (1500 if causal else 900)
    q = torch.randn(1, 32, n, 128, device="cuda", dtype=dtype)
    k, v = (torch.randn(1, 8, t, 128, device="cuda", dtype=dtype) for _ in range(2))
    out, lse = attention_with_lse(q, k, v, 128**-0.5, causal)
    want_out, want_lse = attention_with_lse_formula(q, k, v, 128**-0.5, causal)
    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (1, 32, n)
    torch.testing.assert_close(out.float(), want_out.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=2e-3)


@pytest.mark.parametrize("prefix", [0, 700])
def test_sliding_window_attention_matches_a_masked_full_attention(prefix):
    """A hybrid model's local-layer prefill in query blocks against one attention over the whole
    sequence under the window mask (SGLang's torch-native way), with a cached prefix or none;
    1300 positions cross the 1024-query blocks, and the pool's slots are shuffled."""
    torch.manual_seed(3)
    total, window, heads, kv_heads, dim = 1300, 15, 4, 2, 32
    keys, values = torch.randn(2000, kv_heads, dim), torch.randn(2000, kv_heads, dim)
    req_to_token = torch.zeros(2, 1400, dtype=torch.int32)
    req_to_token[1, :total] = torch.randperm(2000)[:total].int()
    n = total - prefix
    q = torch.randn(n, heads, dim)
    out = torch.empty_like(q)
    lens = [torch.tensor([x]) for x in (1, total, prefix, n)]
    sliding_window_attention(q, out, keys, values, req_to_token, *lens, 0.2, window)

    slots = req_to_token[1, :total].long()
    pos = torch.arange(total)
    mask = (pos[None, :] <= pos[:, None]) & (pos[None, :] >= pos[:, None] - window)
    want = torch.nn.functional.scaled_dot_product_attention(
        q.movedim(0, 1)[None],
        keys[slots].movedim(0, 1)[None],
        values[slots].movedim(0, 1)[None],
        attn_mask=mask[prefix:],
        scale=0.2,
        enable_gqa=True,
    )[0].movedim(0, 1)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


def test_window_slots_are_each_rows_last_positions():
    req_to_token = torch.arange(30).view(3, 10)
    slots, valid = window_slots(req_to_token, torch.tensor([2, 0]), torch.tensor([9, 3]), 3)
    assert slots.tolist() == [[25, 26, 27, 28], [0, 1, 2, 0]]
    assert valid.tolist() == [[True] * 4, [True, True, True, False]]
