"""DynamicKV: task-aware per-layer budgets from a global competition of window scores."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from dynsplit_sglang.config import check_int, check_number, option
from dynsplit_sglang.kernels.window_scores import pool_scores
from dynsplit_sglang.layer_budgets import dynamickv
from dynsplit_sglang.policies.prefill_selection import PrefillSelectionPolicy, prompt_scores, shared_order
from dynsplit_sglang.policies.snapkv import SnapKVOptions


@dataclass(frozen=True)
class DynamicKVOptions(SnapKVOptions):
    """DynamicKV's options (`--kv dynamickv`): SnapKV's scoring and the global budget competition."""

    policy: ClassVar[str] = "dynamickv"
    # `evict` (on, as for the other prefill-time policies) caps a layer at evict_cap x budget, which
    # changes answers; level with eviction off on the accuracy suite (docs/accuracy.md, "Eviction").
    window: int = option(8, "observation window, always kept (DynamicKV: 8)")
    kernel_size: int = option(7, "1-D pooling kernel over positions, odd (DynamicKV: 7)")
    r_max: float = option(10.0, "a layer's temporary maximum budget is r_max times the mean (DynamicKV: 10)")
    evict_cap: float = option(
        2.0,
        "with `evict`: no layer keeps more than evict_cap x budget prompt tokens (what a request's KV slots hold "
        "after compaction); the rest of a layer's share goes to the others",
    )
    update_interval: int = option(
        4,
        "m, layers between re-allocations in the authors' progressive schedule (kept for reference: with the "
        "KV resident only the final allocation matters)",
    )

    def validate(self) -> None:
        super().validate()
        check_number("r_max", self.r_max, 1)
        check_number("evict_cap", self.evict_cap, 1)
        check_int("update_interval", self.update_interval, 1)


def dynamickv_scores(r, window, key_buffers, obs: int, kernel: int, pooling: str) -> torch.Tensor:
    """[L, KvH, N - obs] pooled window scores of the prompt tokens before the window, every layer."""
    n = r.seq_len
    return torch.stack(
        [
            pool_scores(prompt_scores(r, layer, window, key_buffers, obs)[:, : n - obs], kernel, pooling)
            for layer in range(len(key_buffers))
        ]
    )


class DynamicKVPolicy(PrefillSelectionPolicy):
    """DynamicKV: every layer keeps the observation window plus its own number of prompt tokens
    (layer_budgets.dynamickv: a layer's share is its part of the global top window scores), chosen
    per KV head by pooled window attention. The whole-model budget is num_layers * budget; the
    per-layer budgets are recomputed for every request (the authors' code caches the first's)."""

    Options = DynamicKVOptions
    name = Options.policy
    summary = (
        "SnapKV-style ranking per KV head with task-aware per-layer budgets from a global competition of every "
        "layer's scores"
    )

    def prompt_needs(self):
        return self.observation_window(self.options.window)

    def resident_bound(self, budget, prompt_len):
        return min(prompt_len, max(budget, math.ceil(self.options.evict_cap * budget)))

    def rank(self, r, window, key_buffers):
        o = self.options
        n, num_layers = r.seq_len, self.shape.num_layers
        obs = min(o.window, n)
        recent = torch.arange(n - 1, n - obs - 1, -1, device=r.row_slots.device)
        if n == obs:
            return [shared_order(recent, None, n, self.shape.num_kv_heads)] * num_layers, [r.budget] * num_layers
        scores = dynamickv_scores(r, window, key_buffers, obs, o.kernel_size, o.pooling)
        if r.budget >= n:  # nothing to compress: the sequence grows evenly in every layer
            budgets = [r.budget] * num_layers
        else:
            # evicting, a layer keeps at most what the request's compacted slots hold
            cap = self.resident_bound(r.budget, n) if r.evict else n
            budgets = [obs + b for b in dynamickv(scores, r.budget - obs, o.r_max, cap - obs)]
        orders = [
            shared_order(recent, scores[l], min(budgets[l], n), self.shape.num_kv_heads) for l in range(num_layers)
        ]
        return orders, budgets
