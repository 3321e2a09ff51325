"""Torch stand-ins for FlashInfer's attention wrappers, for CPU tests and the GPU benchmarks' --smoke.

`FakeDecodeWrapper` keeps what FlashInfer's fa2 `BatchDecodeWithPagedKVCacheWrapper` keeps
(checked against the 0.7.2.post1 source): in eager mode a reference to the indices tensor given to
`plan` (FlashInfer stores `indices.to(device)`, the very tensor when it is already there, so later
in-place writes are seen), in CUDA-graph mode its own preallocated buffers, copied into at `plan`.
`FakeRaggedPrefillWrapper` and `FakePagedPrefillWrapper` stand in for the two prefill wrappers.
All take both the current API (`plan`, `run`) and the legacy one SGLang 0.5.23 calls
(`begin_forward`, `forward`, `forward_return_lse`, which set the mask and scale at run time).
Like FlashInfer they return a base-2 lse, and `fake_merge_state` merges in base 2. Page size 1,
NHD layout, grouped-query attention; a causal mask is aligned bottom-right (query i of n attends
keys up to i + kv_len - n), as FlashInfer aligns it.
"""

from __future__ import annotations

import math

import torch

LOG2E = 1.0 / math.log(2.0)


def attend(q, k, v, causal, sm_scale, window_left=-1, logits_soft_cap=None):
    """One request: q [n, Hq, D], k, v [m, Hkv, D] -> out [n, Hq, D] (dtype of q), base-2 lse [n, Hq] fp32.
    A query with no key gets out 0 and lse -inf (FlashInfer's convention)."""
    n, hq, d = q.shape
    m, hkv = k.shape[0], k.shape[1]
    group = hq // hkv
    kk = k.float().repeat_interleave(group, dim=1)  # [m, Hq, D]
    vv = v.float().repeat_interleave(group, dim=1)
    logits = torch.einsum("nhd,mhd->hnm", q.float(), kk) * sm_scale  # [Hq, n, m]
    if logits_soft_cap:
        logits = logits_soft_cap * torch.tanh(logits / logits_soft_cap)
    last = torch.arange(n)[:, None] + (m - n)  # bottom-right: the last key each query may see
    keys = torch.arange(m)[None, :]
    allowed = torch.ones(n, m, dtype=torch.bool)
    if causal:
        allowed &= keys <= last
    if window_left is not None and window_left >= 0:
        allowed &= keys >= last - window_left
    logits = logits.masked_fill(~allowed.to(logits.device)[None], float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)  # [Hq, n]
    probs = torch.exp(logits - lse[..., None]).nan_to_num(0.0)
    out = torch.einsum("hnm,mhd->nhd", probs, vv)
    return out.to(q.dtype), (lse * LOG2E).T.contiguous()


def _pages(paged_kv_cache):
    """(k, v) as [slots, Hkv, D]: SGLang passes its 3-D pool buffers, FlashInfer's own API 4-D pages of 1."""
    k, v = paged_kv_cache
    if k.dim() == 4:
        assert k.shape[1] == 1, "page size 1 only"
        k, v = k[:, 0], v[:, 0]
    return k, v


class _Legacy:
    """FlashInfer's deprecated entry points: they store the mask and scale, then run."""

    causal, window_left, logits_soft_cap, scale = False, -1, None, None

    def forward(self, *inputs, causal=None, window_left=-1, logits_soft_cap=None, sm_scale=None, **unused):
        self._set(causal, window_left, logits_soft_cap, sm_scale)
        return self.run(*inputs)

    def forward_return_lse(self, *inputs, causal=None, window_left=-1, logits_soft_cap=None, sm_scale=None, **unused):
        self._set(causal, window_left, logits_soft_cap, sm_scale)
        return self.run(*inputs, return_lse=True)

    def _set(self, causal, window_left, logits_soft_cap, sm_scale):
        if causal is not None:
            self.causal = causal
        self.window_left, self.logits_soft_cap = window_left, logits_soft_cap
        if sm_scale is not None:
            self.scale = sm_scale

    def _scale(self, head_dim):
        return self.scale if self.scale is not None else head_dim**-0.5

    def _attend_requests(self, q, kv_of):
        """Prefill: request r's queries q[qo_indptr[r]:qo_indptr[r+1]] attend to kv_of(kv_indptr[r],
        kv_indptr[r+1]) = its (k, v); a request without queries is skipped (out 0, lse -inf)."""
        out = torch.zeros_like(q)
        lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
        qo, kv = self.qo_indptr.tolist(), self.kv_indptr.tolist()
        for r in range(len(qo) - 1):
            if qo[r + 1] > qo[r]:
                rows = slice(qo[r], qo[r + 1])
                k, v = kv_of(kv[r], kv[r + 1])
                out[rows], lse[rows] = attend(
                    q[rows], k, v, self.causal, self._scale(q.shape[-1]), self.window_left, self.logits_soft_cap
                )
        return out, lse


class FakeDecodeWrapper(_Legacy):
    """Torch stand-in for flashinfer.BatchDecodeWithPagedKVCacheWrapper (NHD, fa2 semantics, page size 1)."""

    def __init__(
        self,
        use_cuda_graph=False,
        indptr_buffer=None,
        indices_buffer=None,
        last_page_len_buffer=None,
        use_tensor_cores=False,
    ):
        # FlashInfer exposes the mode as `is_cuda_graph_enabled` (FoldedSparseDecode reads it).
        self.use_cuda_graph = self.is_cuda_graph_enabled = use_cuda_graph
        self.use_tensor_cores = use_tensor_cores
        self.indptr, self.indices, self.last_page_len = indptr_buffer, indices_buffer, last_page_len_buffer
        self.plans = 0

    def plan(
        self,
        indptr,
        indices,
        last_page_len,
        num_qo_heads,
        num_kv_heads,
        head_dim,
        page_size,
        *,
        pos_encoding_mode="NONE",
        q_data_type=None,
        kv_data_type=None,
        data_type=None,
        sm_scale=None,
        window_left=-1,
        logits_soft_cap=None,
        **unused,
    ):
        """indptr [rows + 1], indices [>= indptr[-1]], last_page_len [rows], all int32 (FlashInfer's signature)."""
        assert indptr.dtype == indices.dtype == last_page_len.dtype == torch.int32
        assert pos_encoding_mode == "NONE" and page_size == 1 and num_qo_heads % num_kv_heads == 0
        rows = indptr.numel() - 1
        assert indices.numel() >= int(indptr[-1]) and bool((last_page_len[:rows] == 1).all())
        if self.use_cuda_graph:  # FlashInfer copies into the buffers it was built with
            assert indices.numel() <= self.indices.numel()
            assert last_page_len.numel() == self.last_page_len.numel(), "the batch is fixed in graph mode"
            self.indptr.copy_(indptr)
            self.last_page_len.copy_(last_page_len)
            self.indices[: indices.numel()].copy_(indices)
        else:  # FlashInfer keeps `indices.to(device)`: the very tensor when already there
            self.indptr, self.indices, self.last_page_len = indptr, indices, last_page_len
        self.num_qo_heads, self.num_kv_heads, self.head_dim = num_qo_heads, num_kv_heads, head_dim
        self.scale, self.window_left, self.logits_soft_cap = sm_scale, window_left, logits_soft_cap
        self.plans += 1

    begin_forward = plan

    def run(self, q, paged_kv_cache, *, return_lse=False, **unused):
        """q [rows, num_qo_heads, D]; paged_kv_cache (k, v), each [num_pages, 1, num_kv_heads, D] or
        [num_slots, num_kv_heads, D]. returns out [rows, num_qo_heads, D] (dtype of q) and, if asked,
        the base-2 lse [rows, num_qo_heads]."""
        k_pages, v_pages = _pages(paged_kv_cache)
        rows = self.indptr.numel() - 1
        assert q.shape == (rows, self.num_qo_heads, self.head_dim), (q.shape, rows)
        assert k_pages.shape[1:] == (self.num_kv_heads, self.head_dim), k_pages.shape
        out = torch.empty_like(q)
        lse = torch.empty(rows, self.num_qo_heads, dtype=torch.float32, device=q.device)
        for r in range(rows):
            pages = self.indices[int(self.indptr[r]) : int(self.indptr[r + 1])].long()
            out[r : r + 1], lse[r : r + 1] = attend(
                q[r : r + 1],
                k_pages[pages],
                v_pages[pages],
                False,
                self._scale(q.shape[-1]),
                self.window_left,
                self.logits_soft_cap,
            )
        return (out, lse) if return_lse else out


class FakeRaggedPrefillWrapper(_Legacy):
    """Torch stand-in for flashinfer.BatchPrefillWithRaggedKVCacheWrapper: request r's queries
    q[qo_indptr[r]:qo_indptr[r+1]] attend to its keys k[kv_indptr[r]:kv_indptr[r+1]]."""

    def __init__(self, *unused_args, **unused_kwargs):
        self.plans = 0

    def plan(
        self,
        qo_indptr,
        kv_indptr,
        num_qo_heads,
        num_kv_heads,
        head_dim_qk,
        head_dim_vo=None,
        *,
        custom_mask=None,
        causal=False,
        sm_scale=None,
        window_left=-1,
        logits_soft_cap=None,
        **unused,
    ):
        assert custom_mask is None, "custom masks are not modelled"
        self.qo_indptr, self.kv_indptr = qo_indptr, kv_indptr  # references, as FlashInfer keeps them
        self.num_qo_heads, self.num_kv_heads = num_qo_heads, num_kv_heads
        self.causal, self.scale, self.window_left, self.logits_soft_cap = causal, sm_scale, window_left, logits_soft_cap
        self.plans += 1

    begin_forward = plan

    def run(self, q, k, v, *, return_lse=False, **unused):
        out, lse = self._attend_requests(q, lambda lo, hi: (k[lo:hi], v[lo:hi]))
        return (out, lse) if return_lse else out


class FakePagedPrefillWrapper(_Legacy):
    """Torch stand-in for flashinfer.BatchPrefillWithPagedKVCacheWrapper (page size 1): request r's
    queries attend to the slots indices[kv_indptr[r]:kv_indptr[r+1]] of the pool."""

    def __init__(self, *unused_args, **unused_kwargs):
        self.plans = 0

    def plan(
        self,
        qo_indptr,
        paged_kv_indptr,
        paged_kv_indices,
        paged_kv_last_page_len,
        num_qo_heads,
        num_kv_heads,
        head_dim_qk,
        page_size,
        head_dim_vo=None,
        *,
        custom_mask=None,
        causal=False,
        sm_scale=None,
        window_left=-1,
        logits_soft_cap=None,
        **unused,
    ):
        assert custom_mask is None, "custom masks are not modelled"
        assert page_size == 1, "page size 1 only"
        self.qo_indptr, self.kv_indptr, self.indices = qo_indptr, paged_kv_indptr, paged_kv_indices
        self.num_qo_heads, self.num_kv_heads = num_qo_heads, num_kv_heads
        self.causal, self.scale, self.window_left, self.logits_soft_cap = causal, sm_scale, window_left, logits_soft_cap
        self.plans += 1

    begin_forward = plan

    def run(self, q, paged_kv_cache, *, return_lse=False, **unused):
        k_pool, v_pool = _pages(paged_kv_cache)

        def kv_of(lo, hi):
            slots = self.indices[lo:hi].long()
            return k_pool[slots], v_pool[slots]

        out, lse = self._attend_requests(q, kv_of)
        return (out, lse) if return_lse else out


def fake_merge_state(v_a, s_a, v_b, s_b):
    """flashinfer.cascade.merge_state: two partial attentions [N, H, D] with base-2 lse [N, H] -> one."""
    s = torch.logaddexp2(s_a.float(), s_b.float())
    w_a = torch.exp2(s_a.float() - s).nan_to_num(0.0)[..., None]
    w_b = torch.exp2(s_b.float() - s).nan_to_num(0.0)[..., None]
    return (v_a.float() * w_a + v_b.float() * w_b).to(v_a.dtype), s


# --- SGLang 0.5.23's FlashInfer backend on the CPU ---------------------------------------------------

STANDIN_BACKEND = "flashinfer_standin"


class FakeSGLangDecodeWrapper(FakeDecodeWrapper):
    """The decode stand-in with FlashInfer's own constructor signature, as SGLang's backend (and
    `sparse_decode_flashinfer.flashinfer_wrapper`) build it.

    SGLang builds it without `use_cuda_graph` and plans its eager decode with an index list
    allocated on device="cuda", unless the wrapper reports CUDA-graph mode, in which case it
    writes into `wrapper._paged_kv_indices_buf`. Built that way, this stand-in reports that mode
    but keeps eager semantics (references to what plan gets), and `build_standin_backend` gives
    it a buffer on the model's device. Built with an explicit `use_cuda_graph` it is
    FakeDecodeWrapper in that mode."""

    def __init__(
        self,
        float_workspace_buffer=None,
        kv_layout="NHD",
        use_cuda_graph=None,
        use_tensor_cores=False,
        paged_kv_indptr_buffer=None,
        paged_kv_indices_buffer=None,
        paged_kv_last_page_len_buffer=None,
        backend="auto",
        **unused,
    ):
        super().__init__(
            bool(use_cuda_graph),
            paged_kv_indptr_buffer,
            paged_kv_indices_buffer,
            paged_kv_last_page_len_buffer,
            use_tensor_cores,
        )
        if use_cuda_graph is None:
            self.is_cuda_graph_enabled = True
            self._paged_kv_indices_buf = None


def _graph_only(*args, **kwargs):
    raise NotImplementedError("fast_decode_plan belongs to CUDA-graph replays, which the stand-ins do not model")


def install_in_sglang() -> None:
    """Define FlashInfer's names in SGLang's FlashInfer backend module with these stand-ins and
    register the attention backend `flashinfer_standin`, which builds SGLang's own
    FlashInferAttnBackend on them. For CPU tests: run it in every SGLang process with
    `dynsplit_sglang.testing.process_setup.in_sglang_processes` (a Triton kernel of SGLang's
    index packing also needs TRITON_INTERPRET=1 there)."""
    from sglang.srt.layers.attention import flashinfer_backend as fb
    from sglang.srt.layers.attention.attention_registry import register_attention_backend
    from sglang.srt.server_args import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices

    fb.BatchDecodeWithPagedKVCacheWrapper = FakeSGLangDecodeWrapper
    fb.BatchPrefillWithPagedKVCacheWrapper = FakePagedPrefillWrapper
    fb.BatchPrefillWithRaggedKVCacheWrapper = FakeRaggedPrefillWrapper
    fb.fast_decode_plan = _graph_only
    fb.merge_state = fb._safe_merge_state = fake_merge_state
    if STANDIN_BACKEND not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([STANDIN_BACKEND])
    register_attention_backend(STANDIN_BACKEND)(build_standin_backend)


def build_standin_backend(model_runner):
    """SGLang's FlashInferAttnBackend on the stand-ins, on the model's device."""
    from sglang.srt.layers.attention.flashinfer_backend import FlashInferAttnBackend

    backend = FlashInferAttnBackend(model_runner)
    slots = model_runner.req_to_token_pool.req_to_token.numel()
    for wrapper in backend.decode_wrappers:
        wrapper._paged_kv_indices_buf = torch.empty(slots, dtype=torch.int32, device=model_runner.device)
    return backend
