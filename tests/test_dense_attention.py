"""`attention_with_lse` (the prefill kernel call that also returns the lse) against the plain
formula, on the CPU and on a GPU. No SGLang import: the GPU box runs this file."""

import pytest
import torch

from dynsplit_sglang.kernels.dense_attention import attention_with_lse, attention_with_lse_formula


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
