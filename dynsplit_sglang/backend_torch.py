"""Every compressing `--kv` policy on the torch path: SGLang's torch-native attention plus a policy.

Prefill stays dense (causal attention of the new tokens only, `extend_attention`). The policy sees band
logits and row lse of its score layers and the queries of the last prompt tokens of its query
layers, and commits its per-request state after the last layer. At decode, a request whose
sequence fits the budget takes SGLang's dense decode path unchanged (`--kv full`'s tokens); a
longer one attends only to the positions the policy selects, per KV head, with the original
positions (the `req_to_token` row is never compacted, so RoPE and the radix cache are untouched).
A hybrid model's sliding-window layers are not compressed (hybrid_layers.py): they attend over
their window only, at prefill in query blocks and at decode over each request's last window slots.
"""

from __future__ import annotations

import torch
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from sglang.srt.model_executor.runner_backend_utils.breakable_cuda_graph.breakable_cuda_graph import eager_on_graph
from torch.profiler import record_function

from dynsplit_sglang.config import KVConfig
from dynsplit_sglang.gpu_path import sparse_attention_op
from dynsplit_sglang.policy_host import PolicyHost


class SparseTorchAttnBackend(PolicyHost, TorchNativeAttnBackend):
    def __init__(self, model_runner, kv: KVConfig):
        TorchNativeAttnBackend.__init__(self, model_runner)
        # The decode attention over the selected slots: the torch op, or FlashInfer's paged decode
        # with the KV heads folded into the batch ($DYNSPLIT_SPARSE_ATTENTION=flashinfer, CUDA).
        self._init_policy(
            model_runner,
            kv,
            lambda shape: sparse_attention_op(
                self.device, shape.num_kv_heads, shape.num_heads // shape.num_kv_heads, shape.head_dim
            ),
        )

    def init_forward_metadata(self, forward_batch):
        super().init_forward_metadata(forward_batch)
        self._begin_forward(forward_batch)

    # --- prefill ------------------------------------------------------------------------------
    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        """Dense causal attention of the new tokens (`extend_attention`); the policy gets the last
        queries of its query layers and the band logits and row lse of its score layers."""
        self._check_layer(layer)
        o = self._dense_extend(q, k, v, layer, forward_batch, save_kv_cache)
        self._finish_layer(layer)
        return o

    # --- decode -------------------------------------------------------------------------------
    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        self._check_layer(layer)
        return self._decode(q, k, v, layer, forward_batch, save_kv_cache)

    @eager_on_graph
    def _decode(self, q, k, v, layer, forward_batch, save_kv_cache):
        """One layer's decode attention and the policy's observations. returns [rows of q, H * D].

        In a breakable CUDA graph this is the eager break (see backend_flashinfer: a replay calls
        it with the capture's arguments); rows past the real requests are graph padding, whose
        output is 0."""
        H, D = layer.tp_q_head_num, layer.qk_head_dim
        if self._graph_capture:  # the dummy batch of a capture: only the output buffer counts
            return q.new_zeros(q.shape[0], H * D)
        q3 = q.reshape(-1, H, D)
        index = self._policy_layer(layer)
        if index is None:  # a sliding-window layer: the window's slots, nothing to observe
            self._save_kv(layer, forward_batch, k, v, save_kv_cache)
            n, w = len(self._reqs), self._step.sliding
            keys = self.token_to_kv_pool.get_key_buffer(layer.layer_id)
            values = self.token_to_kv_pool.get_value_buffer(layer.layer_id)
            out, _ = self._sparse_attention(q3[:n], keys, values, w.slots, w.valid, layer.scaling, counts=w.counts)
            self._finish_layer(layer)
            o = q.new_zeros(q3.shape[0], H * D)
            o[:n] = out.reshape(n, H * D)
            return o
        sel = self._sparse_requests(layer)
        if sel is None:
            o = super().forward_decode(q, k, v, layer, forward_batch, save_kv_cache)
        else:
            o, sparse_lse = self._forward_decode_mixed(q3, k, v, layer, forward_batch, save_kv_cache, sel)
        if index in self._score_layers:
            lse = torch.zeros(q3.shape[0], H, device=q3.device)  # the sparse requests'; the others' come next
            if sel is not None:
                lse[sel.index] = sparse_lse
            self._observe_decode(q3, layer, lse, range(len(self._reqs)) if sel is None else sel.dense_indices)
        self._finish_layer(layer)
        o[len(self._reqs) :] = 0
        return o

    # --- CUDA-graph state SGLang's graph runner asks every backend for --------------------------
    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int):
        """Nothing to preallocate: decode attention runs eagerly between the captured segments."""

    def get_cuda_graph_seq_len_fill_value(self):
        return 1  # a padded row attends to one slot (SGLang's padding slot), as FlashInfer's does

    def _forward_decode_mixed(self, q3, k, v, layer, fb, save_kv_cache, sel):
        """The requests `sel` attend to what their policy selects, the others densely. returns the
        output [rows of q3, H * D] and the sparse requests' lse [S, H]."""
        self._save_kv(layer, fb, k, v, save_kv_cache)
        o3 = torch.empty_like(q3)
        keys = self.token_to_kv_pool.get_key_buffer(layer.layer_id)
        values = self.token_to_kv_pool.get_value_buffer(layer.layer_id)
        if sel.dense_indices:
            idx = sel.dense
            o_dense = torch.empty_like(q3[idx])
            self._run_sdpa_forward_decode(
                q3[idx],
                o_dense,
                keys,
                values,
                self.req_to_token_pool.req_to_token,
                fb.req_pool_indices[idx],
                fb.seq_lens[idx],
                None,
                scaling=layer.scaling,
                enable_gqa=layer.tp_q_head_num != layer.tp_k_head_num,
            )
            o3[idx] = o_dense
        slots, valid = self._select_slots(q3, layer, sel)
        # Known on the host, the counts spare the op a device read (and plan FlashInfer's decode).
        counts = self.policy.selection_counts(self._policy_layer(layer), sel.indices)
        with record_function("dynsplit:attention"):
            out, lse = self._sparse_attention(q3[sel.index], keys, values, slots, valid, layer.scaling, counts=counts)
        o3[sel.index] = out
        return o3.view(q3.shape[0], -1), lse
