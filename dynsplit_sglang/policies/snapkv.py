"""SnapKV and PyramidKV: the last prompt queries vote for the prompt tokens each KV head keeps."""

from __future__ import annotations

from dynsplit_sglang.layer_budgets import pyramid
from dynsplit_sglang.policies.prefill_selection import PrefillSelectionPolicy


class SnapKVPolicy(PrefillSelectionPolicy):
    """SnapKV: every layer keeps the observation window plus the prompt tokens with the highest
    pooled window attention, budget tokens in all, per KV head (GQA: the scores of a KV head's
    query heads are summed, so the heads that share a KV head share its selection)."""

    name = "snapkv"

    def query_window(self) -> int:
        return self.options.window

    def layer_budgets(self, r) -> list[int]:
        return [r.budget] * self.shape.num_layers

    def rank(self, r, window, key_buffers):
        o = self.options
        budgets = self.layer_budgets(r)
        orders = [
            self.snap_order(r, layer, window, key_buffers, o.window, budgets[layer], o.kernel_size, o.pooling)
            for layer in range(self.shape.num_layers)
        ]
        return orders, budgets


class PyramidKVPolicy(SnapKVPolicy):
    """PyramidKV: SnapKV's ranking with per-layer budgets that fall linearly with depth
    (layer_budgets.pyramid); the mean over layers is the budget."""

    name = "pyramidkv"

    def layer_budgets(self, r) -> list[int]:
        o = self.options
        n = r.seq_len
        if r.budget >= n:  # nothing to compress: the sequence grows evenly in every layer
            return [r.budget] * self.shape.num_layers
        window = min(o.window, n)
        return [window + b for b in pyramid(r.budget - window, self.shape.num_layers, o.beta, n - window)]
