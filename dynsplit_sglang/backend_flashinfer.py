"""Every compressing `--kv` policy on SGLang's FlashInfer backend (eager; `--attention-backend dynsplit_flashinfer`).

A subclass of SGLang's `FlashInferAttnBackend`, not a copy of it:

- Prefill: SGLang's FlashInfer prefill, unchanged, in every layer except the policy's score
  layers, which need each query's row log-sum-exp as well (DD-Select); those call the same
  planned wrappers through `forward_return_lse` (ragged for the new tokens, paged for a cached
  prefix, merged by `merge_state`), as SGLang's own prefill does when it has a prefix.
- Decode: every request of the step attends through `FlashInferSparseAttention`, FlashInfer's
  paged decode with the KV heads folded into the batch: a sparse request to the slots its policy
  selected in this layer, a request within its budget to all of its slots. One plan serves every
  layer of a step while the counts hold (selection fills the budget), so SGLang's own decode
  planning is skipped.

CUDA graphs: decode can run under SGLang's breakable CUDA graphs
(`--cuda-graph-backend-decode breakable`; patches/cuda_graph.py): the model's GEMMs, norms and
RoPE are captured, and each layer's attention (`_decode`, an `eager_on_graph` break) runs eagerly
between the captured segments, so the policy's selection and bookkeeping keep their
data-dependent shapes and host reads. Before each replay `init_forward_metadata_out_graph`
(PolicyHost) gives the policy the batch's real requests. Without that flag, CUDA graphs are off.
On a CPU the same code runs on torch stand-ins for FlashInfer's wrappers
(dynsplit_sglang/testing/fake_flashinfer.py), which is how the tests run it.
"""

from __future__ import annotations

import torch
from sglang.srt.layers.attention import flashinfer_backend as sglang_flashinfer
from sglang.srt.layers.attention.flashinfer_backend import FlashInferAttnBackend
from sglang.srt.model_executor.runner_backend_utils.breakable_cuda_graph.breakable_cuda_graph import eager_on_graph

from dynsplit_sglang.config import KVConfig
from dynsplit_sglang.hybrid_layers import refuse_sliding_layers_on_flashinfer
from dynsplit_sglang.policy_host import PolicyHost
from dynsplit_sglang.sparse_decode_flashinfer import LN2, FlashInferSparseAttention, flashinfer_wrapper

BACKEND_NAME = "dynsplit_flashinfer"


class SparseFlashInferAttnBackend(PolicyHost, FlashInferAttnBackend):
    def __init__(self, model_runner, kv: KVConfig):
        if not hasattr(sglang_flashinfer, "BatchDecodeWithPagedKVCacheWrapper"):
            raise ValueError(
                f"--attention-backend {BACKEND_NAME} needs FlashInfer on a CUDA GPU "
                "(pip install flashinfer-python); without one, drop the flag (torch backend)"
            )
        FlashInferAttnBackend.__init__(self, model_runner)
        self.device = model_runner.device  # the torch-native backend has it; this one does not
        # The decode wrapper class SGLang's module uses: FlashInfer's on a GPU, the stand-in in
        # CPU tests (which replace that module's names).
        wrapper_class = sglang_flashinfer.BatchDecodeWithPagedKVCacheWrapper
        workspace = self.workspace_buffer

        def make_sparse_attention(shape):
            op = FlashInferSparseAttention(
                flashinfer_wrapper(workspace, use_cuda_graph=False, wrapper_class=wrapper_class),
                shape.num_kv_heads,
                shape.num_heads // shape.num_kv_heads,
                shape.head_dim,
                self.device,
            )
            return "flashinfer", op

        self._init_policy(model_runner, kv, make_sparse_attention)
        if self._window:  # kv_cli refuses it at startup where it can read the config
            refuse_sliding_layers_on_flashinfer(self._compressed)

    def init_forward_metadata(self, forward_batch):
        # Decode attends through the folded sparse decode only: SGLang's decode plan (a gather of
        # every request's whole slot list) would go unused.
        if not forward_batch.forward_mode.is_decode():
            super().init_forward_metadata(forward_batch)
        self._begin_forward(forward_batch)

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int, kv_indices_buf=None):
        """Nothing to preallocate. SGLang's version allocates its graphs' KV index and mask
        buffers (max_num_tokens x context_len each, ~170 MB at 256 rows and 128k), which only its
        own graph-captured decode and prefill read; here decode attention runs eagerly between a
        breakable graph's segments and prefill graphs are off (patches/cuda_graph.py)."""

    # --- prefill ------------------------------------------------------------------------------
    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        self._check_layer(layer)
        q3 = q.contiguous().view(-1, layer.tp_q_head_num, layer.qk_head_dim)
        if self._policy_layer(layer) in self._score_layers:  # the same dense attention, plus each query's row lse
            o, lse = self._extend_with_lse(q3, k, v, layer, forward_batch, save_kv_cache)
            lengths = forward_batch.extend_seq_lens_cpu
            lengths = [int(n) for n in (forward_batch.extend_seq_lens.tolist() if lengths is None else lengths)]
            # per request [H, n], natural log (FlashInfer's lse is base 2)
            self._observe_prefill(q3, layer, [part.T for part in (lse.float() * LN2).split(lengths)])
        else:
            o = super().forward_extend(q, k, v, layer, forward_batch, save_kv_cache)
            self._observe_prefill(q3, layer, None)
        self._finish_layer(layer)
        return o.view(-1, layer.tp_q_head_num * layer.head_dim)

    def _extend_with_lse(self, q3, k, v, layer, fb, save_kv_cache):
        """Causal attention of the new tokens through the wrappers SGLang planned for this prefill,
        with each query's base-2 log-sum-exp. returns out [T, H, D], lse [T, H]."""
        md = self.forward_metadata
        paged = md.prefill_wrappers[self._get_wrapper_idx(layer)]
        kv_cache = self.token_to_kv_pool.get_kv_buffer(layer.layer_id)
        if not md.use_ragged:  # one paged call over prefix and new tokens, which go in first
            self._save_kv(layer, fb, k, v, save_kv_cache)
            return paged.forward_return_lse(q3, kv_cache, causal=True, sm_scale=layer.scaling)
        kvh, d = layer.tp_k_head_num, layer.qk_head_dim
        o, lse = self.prefill_wrapper_ragged.forward_return_lse(
            q3, k.view(-1, kvh, d), v.view(-1, kvh, d), causal=True, sm_scale=layer.scaling
        )
        if not md.extend_no_prefix:  # the cached prefix, all of it visible to every new query
            o_prefix, lse_prefix = paged.forward_return_lse(q3, kv_cache, causal=False, sm_scale=layer.scaling)
            o, lse = sglang_flashinfer._safe_merge_state(o, lse, o_prefix, lse_prefix)
        self._save_kv(layer, fb, k, v, save_kv_cache)
        return o, lse

    # --- decode -------------------------------------------------------------------------------
    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        self._check_layer(layer)
        return self._decode(q, k, v, layer, forward_batch, save_kv_cache)

    @eager_on_graph
    def _decode(self, q, k, v, layer, fb, save_kv_cache):
        """One layer's decode attention: KV write, selection, folded sparse decode, the policy's
        observations. returns [rows of q, H * D].

        In a breakable CUDA graph this is the eager break: a replay calls it with the capture's
        arguments (static buffers holding this step's values; `fb` the capture's batch, read
        only for its per-row buffers) and copies the result into the captured output. Rows past
        the real requests are graph padding: their KV goes to SGLang's padding slot and their
        output stays 0."""
        width = layer.tp_q_head_num * layer.head_dim
        if self._graph_capture:  # the dummy batch of a capture: only the output buffer counts
            return q.new_zeros(q.shape[0], width)
        self._save_kv(layer, fb, k, v, save_kv_cache)
        n = len(self._reqs)
        q3 = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)
        sel = self._sparse_requests(layer)
        slots, valid = self._step_slots(q3, layer, sel)
        keys = self.token_to_kv_pool.get_key_buffer(layer.layer_id)
        values = self.token_to_kv_pool.get_value_buffer(layer.layer_id)
        counts = self._step_counts(layer, sel)
        out, lse = self._sparse_attention(q3[:n], keys, values, slots, valid, layer.scaling, counts=counts)
        if self._policy_layer(layer) in self._score_layers:  # every row's lse is over what it attended
            self._observe_decode(q3, layer, lse, ())
        self._finish_layer(layer)
        if q3.shape[0] == n:
            return out.view(n, width)
        padded = q.new_zeros(q3.shape[0], width)
        padded[:n] = out.view(n, width)
        return padded

    def _step_counts(self, layer, sel) -> list[int] | None:
        """Slots each request attends to in this layer, from the host (no device read): all of
        a dense request's, the policy's count for a sparse one; None if the policy cannot say."""
        counts = list(self._step.lengths)
        if sel is not None:
            picked = self.policy.selection_counts(self._policy_layer(layer), sel.indices)
            if picked is None:
                return None
            for i, c in zip(sel.indices, picked):
                counts[i] = c
        return counts

    def _step_slots(self, q3, layer, sel) -> tuple[torch.Tensor, torch.Tensor]:
        """slots, valid [B, KvH, W] for every request of the step: the selection of the sparse
        ones (`sel`), all slots of the others (each row's valid entries first)."""
        step = self._step
        picked, picked_valid = self._select_slots(q3, layer, sel) if sel is not None else (None, None)
        dense = range(len(self._reqs)) if sel is None else sel.dense_indices
        width = max([step.lengths[i] for i in dense] + [picked.shape[2] if sel is not None else 0])
        shape = (len(self._reqs), self.shape.num_kv_heads, width)
        slots = torch.zeros(shape, dtype=torch.int64, device=q3.device)
        valid = torch.zeros(shape, dtype=torch.bool, device=q3.device)
        if dense:  # all slots of each: its row of the step's slots, cut at its length
            idx = torch.arange(len(self._reqs), device=q3.device) if sel is None else sel.dense
            inside = torch.arange(width, device=q3.device) < step.seq_lens[idx][:, None]  # [D, width]
            slots[idx] = torch.where(inside, step.slots[idx, :width], 0)[:, None, :]
            valid[idx] = inside[:, None, :]
        if sel is not None:
            slots[sel.index, :, : picked.shape[2]] = picked
            valid[sel.index, :, : picked.shape[2]] = picked_valid
        return slots, valid
