"""The backend's prefill attention against SGLang's torch-native one."""

import pytest
import torch
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

from dynsplit_sglang.kernels.dd_select import row_lse
from dynsplit_sglang.kernels.dense_attention import extend_attention


@pytest.mark.parametrize("lens", [[(0, 300)], [(2016, 32), (0, 77), (389, 5)], [(512, 512), (100, 1)], [(4064, 33)]])
def test_extend_attention_matches_sglangs_padded_extend(lens):
    """lens: per request (cached prefix, new tokens): a miss, radix hits and prefill chunks. A miss
    is the very kernel call SDPA makes (bit-identical); with a prefix, two calls merged by their
    lse may round the last bit differently."""
    torch.manual_seed(0)
    heads, kv_heads, dim, slots = 9, 3, 64, 8192
    k_cache, v_cache = torch.randn(slots, kv_heads, dim), torch.randn(slots, kv_heads, dim)
    req_to_token = torch.stack([torch.randperm(slots)[:4100] for _ in lens])
    prefix = torch.tensor([p for p, _ in lens])
    new = torch.tensor([n for _, n in lens])
    query = torch.randn(int(new.sum()), heads, dim)
    args = (k_cache, v_cache, req_to_token, torch.arange(len(lens)), prefix + new, prefix, new)
    ours = torch.empty_like(query)
    lses = extend_attention(query, ours, *args, 0.125)
    theirs = TorchNativeAttnBackend._run_sdpa_forward_extend(
        None,
        query,
        torch.empty_like(query),
        *args,
        scaling=0.125,
        enable_gqa=True,
        causal=True,
    )
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    if all(p == 0 for p, _ in lens):
        assert torch.equal(ours, theirs)
    # the lse that feeds DD-Select: each new query's log-sum-exp over its causal row
    start = 0
    for i, (p, n) in enumerate(lens):
        keys = k_cache[req_to_token[i, : p + n]]
        torch.testing.assert_close(lses[i], row_lse(query[start : start + n], keys, p, 0.125), rtol=0, atol=2e-5)
        start += n
