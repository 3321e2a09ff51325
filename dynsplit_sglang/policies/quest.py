"""Quest: fixed pages with per-channel key min/max, the top pages re-selected every decode step.

Quest is DynSplit-KV with rigid blocks: the same block records, scoring (the upper bound
sum_d max(q_d kmin_d, q_d kmax_d)) and budget-filling selection, with blocks cut every `page_size`
tokens and no sink or recent window beyond the unfinished page (as in Quest). Quest counts its
budget in whole pages with the unfinished one among them; here the budget is in tokens and the
last page in score order is cut to fill it, so both attend to about the same number of tokens.
"""

from __future__ import annotations

import dataclasses

import torch

from dynsplit_sglang.config import DynSplitConfig, KVConfig
from dynsplit_sglang.policies.base import KVPolicy
from dynsplit_sglang.policies.dynsplit import DynSplitPolicy


def quest_block_config(page_size: int) -> DynSplitConfig:
    return DynSplitConfig(
        block_size=page_size, delta=0, split="fixed_interval", candidates="all", sink_tokens=0, recent_tokens=0
    )


class QuestPolicy(DynSplitPolicy):
    name = "quest"

    def __init__(self, kv: KVConfig, shape, num_slots, dtype, device, tokens=None):
        self.quest = kv.options
        inner = dataclasses.replace(kv, options=quest_block_config(self.quest.page_size))
        super().__init__(inner, shape, num_slots, dtype, device, tokens)
        self.kv = kv

    def select(self, layer_id, req_index, q):
        if layer_id < self.quest.dense_layers:  # Quest keeps its first layers dense
            n = self._reqs[req_index].seq_len
            positions = torch.arange(n, device=q.device)[None, :].expand(self.shape.num_kv_heads, -1)
            return positions, torch.ones_like(positions, dtype=torch.bool)
        return super().select(layer_id, req_index, q)

    def select_batch(self, layer_id, req_indices, q):
        if layer_id < self.quest.dense_layers:
            return KVPolicy.select_batch(self, layer_id, req_indices, q)
        return super().select_batch(layer_id, req_indices, q)

    def select_slots_batch(self, layer_id, req_indices, q, req_slots):
        if layer_id < self.quest.dense_layers:
            return KVPolicy.select_slots_batch(self, layer_id, req_indices, q, req_slots)
        return super().select_slots_batch(layer_id, req_indices, q, req_slots)

    def selection_counts(self, layer_id, req_indices):
        if layer_id < self.quest.dense_layers:  # the whole sequence
            return [self._reqs[i].seq_len for i in req_indices]
        return super().selection_counts(layer_id, req_indices)
