"""Torch stand-in for FlashInfer's paged decode wrapper, for CPU tests and the GPU benchmarks' --smoke.

It keeps what FlashInfer's fa2 `BatchDecodeWithPagedKVCacheWrapper` keeps (checked against the
0.7.2.post1 source): in eager mode a reference to the indices tensor given to `plan` (FlashInfer
stores `indices.to(device)`, the very tensor when it is already there, so later in-place writes
are seen), in CUDA-graph mode its own preallocated buffers, copied into at `plan`. Like
FlashInfer it returns a base-2 lse. Page size 1, NHD layout, grouped-query attention.
"""

from __future__ import annotations

import math

import torch


class FakeDecodeWrapper:
    """Torch stand-in for flashinfer.BatchDecodeWithPagedKVCacheWrapper (NHD, fa2 semantics, page size 1)."""

    def __init__(self, use_cuda_graph=False, indptr_buffer=None, indices_buffer=None, last_page_len_buffer=None,
                 use_tensor_cores=False):
        # FlashInfer exposes the mode as `is_cuda_graph_enabled` (FoldedSparseDecode reads it).
        self.use_cuda_graph = self.is_cuda_graph_enabled = use_cuda_graph
        self.use_tensor_cores = use_tensor_cores
        self.indptr, self.indices, self.last_page_len = indptr_buffer, indices_buffer, last_page_len_buffer
        self.plans = 0

    def plan(self, indptr, indices, last_page_len, num_qo_heads, num_kv_heads, head_dim, page_size, *,
             pos_encoding_mode, q_data_type, kv_data_type, sm_scale):
        """indptr [rows + 1], indices [indptr[-1]], last_page_len [rows], all int32 (FlashInfer's signature)."""
        assert indptr.dtype == indices.dtype == last_page_len.dtype == torch.int32
        assert pos_encoding_mode == "NONE" and page_size == 1 and num_qo_heads % num_kv_heads == 0
        assert indices.numel() == int(indptr[-1]) and bool((last_page_len == 1).all())
        if self.use_cuda_graph:  # FlashInfer copies into the buffers it was built with
            assert indices.numel() <= self.indices.numel()
            assert last_page_len.numel() == self.last_page_len.numel(), "the batch is fixed in graph mode"
            self.indptr.copy_(indptr)
            self.last_page_len.copy_(last_page_len)
            self.indices[: indices.numel()].copy_(indices)
        else:  # FlashInfer keeps `indices.to(device)`: the very tensor when already there
            self.indptr, self.indices, self.last_page_len = indptr, indices, last_page_len
        self.num_qo_heads, self.num_kv_heads = num_qo_heads, num_kv_heads
        self.head_dim, self.scale = head_dim, sm_scale
        self.plans += 1

    def run(self, q, paged_kv_cache, *, return_lse=False):
        """q [rows, num_qo_heads, D]; paged_kv_cache (k, v), each [num_pages, 1, num_kv_heads, D].
        returns out [rows, num_qo_heads, D] (dtype of q) and, if asked, the base-2 lse [rows, num_qo_heads]."""
        k_pages, v_pages = paged_kv_cache
        rows = self.indptr.numel() - 1
        assert q.shape == (rows, self.num_qo_heads, self.head_dim), (q.shape, rows)
        assert k_pages.shape[1:] == (1, self.num_kv_heads, self.head_dim), k_pages.shape
        group = self.num_qo_heads // self.num_kv_heads
        out = torch.empty_like(q)
        lse = torch.empty(rows, self.num_qo_heads, dtype=torch.float32, device=q.device)
        for r in range(rows):
            pages = self.indices[int(self.indptr[r]) : int(self.indptr[r + 1])].long()
            for h in range(self.num_kv_heads):
                heads = slice(h * group, (h + 1) * group)
                k, v = k_pages[pages, 0, h].float(), v_pages[pages, 0, h].float()
                logits = q[r, heads].float() @ k.T * self.scale  # [G, n]
                lse[r, heads] = torch.logsumexp(logits, -1) / math.log(2)
                out[r, heads] = (torch.softmax(logits, -1) @ v).to(q.dtype)
        return (out, lse) if return_lse else out
