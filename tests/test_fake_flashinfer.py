"""The torch stand-ins for FlashInfer's wrappers (dynsplit_sglang/testing/fake_flashinfer.py) against SDPA,
called the way SGLang 0.5.23's FlashInfer backend calls them (legacy begin_forward / forward).
They let CPU tests run code written for FlashInfer; they must mean what FlashInfer means."""

import math

import torch
import torch.nn.functional as F

from dynsplit_sglang.testing.fake_flashinfer import (
    FakeDecodeWrapper,
    FakePagedPrefillWrapper,
    FakeRaggedPrefillWrapper,
    fake_merge_state,
)

HQ, HKV, D = 6, 2, 16
SCALE = 0.3


def sdpa(q, k, v, mask):
    """Reference: q [n, Hq, D], k, v [m, Hkv, D], mask [n, m] bool -> out [n, Hq, D], base-2 lse [n, Hq]."""
    qh, kh, vh = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=SCALE, enable_gqa=True)[0].transpose(0, 1)
    logits = torch.einsum("nhd,mhd->hnm", q, k.repeat_interleave(HQ // HKV, dim=1)) * SCALE
    lse = torch.logsumexp(logits.masked_fill(~mask, float("-inf")), -1).T / math.log(2)
    return out, lse


def bottom_right(n, m):
    return torch.arange(m)[None, :] <= torch.arange(n)[:, None] + (m - n)


def indptr(lengths):
    return torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0).to(torch.int32)


def test_ragged_prefill_is_causal_attention_per_request():
    lens = [5, 0, 7]  # an empty request in the middle
    q, k, v = (torch.randn(sum(lens), h, D) for h in (HQ, HKV, HKV))
    w = FakeRaggedPrefillWrapper(torch.empty(8), "NHD", backend="fa2")
    w.begin_forward(indptr(lens), indptr(lens), HQ, HKV, D, q_data_type=torch.float32)
    out, lse = w.forward_return_lse(q, k, v, causal=True, sm_scale=SCALE, window_left=-1, logits_soft_cap=None)
    start = 0
    for n in lens:
        if n:
            rows = slice(start, start + n)
            want_out, want_lse = sdpa(q[rows], k[rows], v[rows], bottom_right(n, n))
            torch.testing.assert_close(out[rows], want_out, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(lse[rows], want_lse, rtol=1e-5, atol=1e-5)
        start += n
    assert torch.equal(w.forward(q, k, v, causal=True, sm_scale=SCALE, logits_soft_cap=None), out)


def test_paged_prefill_attends_to_the_cached_prefix_bottom_right():
    """Two requests, 3 and 4 new queries over 10 and 4 keys (7 cached): query i sees keys <= i + 7."""
    pool_k, pool_v = torch.randn(64, HKV, D), torch.randn(64, HKV, D)  # SGLang's 3-D pool buffers
    slots = [torch.randperm(64)[:10], torch.randperm(64)[:4]]
    qo, kv = [3, 4], [10, 4]
    q = torch.randn(sum(qo), HQ, D)
    w = FakePagedPrefillWrapper(torch.empty(8), "NHD", backend="fa2")
    indices = torch.cat(slots + [torch.zeros(256, dtype=torch.int64)]).to(torch.int32)  # padded, as SGLang does
    w.begin_forward(
        indptr(qo),
        indptr(kv),
        indices,
        torch.ones(2, dtype=torch.int32),
        HQ,
        HKV,
        D,
        1,
        q_data_type=torch.float32,
        kv_data_type=torch.float32,
        custom_mask=None,
        non_blocking=True,
    )
    # plan has no causal argument here: the legacy forward sets it (FlashInfer does the same)
    out, lse = w.forward_return_lse(
        q,
        (pool_k, pool_v),
        causal=True,
        sm_scale=SCALE,
        window_left=-1,
        logits_soft_cap=None,
        k_scale=None,
        v_scale=None,
    )
    start = 0
    for n, m, s in zip(qo, kv, slots):
        rows = slice(start, start + n)
        want_out, want_lse = sdpa(q[rows], pool_k[s], pool_v[s], bottom_right(n, m))
        torch.testing.assert_close(out[rows], want_out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse[rows], want_lse, rtol=1e-5, atol=1e-5)
        start += n


def test_merge_state_of_two_halves_is_the_whole_attention():
    q, k, v = torch.randn(5, HQ, D), torch.randn(12, HKV, D), torch.randn(12, HKV, D)
    everything = torch.ones(5, 12, dtype=torch.bool)
    first = sdpa(q, k[:7], v[:7], everything[:, :7])
    second = sdpa(q, k[7:], v[7:], everything[:, 7:])
    out, lse = fake_merge_state(first[0], first[1], second[0], second[1])
    want_out, want_lse = sdpa(q, k, v, everything)
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)


def test_decode_the_way_sglang_plans_and_runs_it():
    pool_k, pool_v = torch.randn(40, HKV, D), torch.randn(40, HKV, D)
    lens = [9, 1, 30]
    slots = [torch.randperm(40)[:n] for n in lens]
    q = torch.randn(3, HQ, D)
    w = FakeDecodeWrapper()
    w.begin_forward(
        indptr(lens),
        torch.cat(slots).to(torch.int32),
        torch.ones(3, dtype=torch.int32),
        HQ,
        HKV,
        D,
        1,
        data_type=torch.float32,
        q_data_type=torch.float32,
        non_blocking=True,
        fixed_split_size=None,
        disable_split_kv=False,
    )
    out = w.forward(q, (pool_k, pool_v), sm_scale=SCALE, logits_soft_cap=None, k_scale=None, v_scale=None)
    for r, s in enumerate(slots):
        want, _ = sdpa(q[r : r + 1], pool_k[s], pool_v[s], torch.ones(1, len(s), dtype=torch.bool))
        torch.testing.assert_close(out[r : r + 1], want, rtol=1e-5, atol=1e-5)
