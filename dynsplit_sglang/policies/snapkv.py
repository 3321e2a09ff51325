"""SnapKV and PyramidKV: the last prompt queries vote for the prompt tokens each KV head keeps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from dynsplit_sglang.config import KVConfigError, check_choice, check_int, option
from dynsplit_sglang.layer_budgets import pyramid
from dynsplit_sglang.policies.prefill_selection import PrefillOptions, PrefillSelectionPolicy

POOLINGS = ("avg", "max")


@dataclass(frozen=True)
class SnapKVOptions(PrefillOptions):
    """SnapKV's options (`--kv snapkv`); PyramidKV and DynamicKV score the same way and add theirs."""

    policy: ClassVar[str] = "snapkv"
    window: int = option(32, "observation window: the last prompt queries that vote, always kept (SnapKV: 32)")
    kernel_size: int = option(5, "1-D pooling kernel over positions, odd (SnapKV: 5)")
    pooling: str = option("avg", '`"avg"` or `"max"` pooling')

    def validate(self) -> None:
        super().validate()
        check_int("window", self.window, 1)
        check_int("kernel_size", self.kernel_size, 1)
        if self.kernel_size % 2 == 0:
            raise KVConfigError(
                f"--kv-config: 'kernel_size' must be odd (the pooling is centred), got {self.kernel_size}"
            )
        check_choice("pooling", self.pooling, POOLINGS)

    def min_budget(self) -> int:
        return self.window + 1

    def budget_floor_reason(self) -> str:
        return f"the observation window ({self.window}) is always kept and at least one more token is chosen"


@dataclass(frozen=True)
class PyramidKVOptions(SnapKVOptions):
    """PyramidKV's options (`--kv pyramidkv`): SnapKV's, a smaller window, and the pyramid's slope."""

    policy: ClassVar[str] = "pyramidkv"
    window: int = option(8, "observation window, always kept (PyramidKV: 8)")
    beta: int = option(20, "ratio that sets the smallest (last) layer budget, about mean/beta (PyramidKV: 20)")

    def validate(self) -> None:
        super().validate()
        check_int("beta", self.beta, 1)


class SnapKVPolicy(PrefillSelectionPolicy):
    """SnapKV: every layer keeps the observation window plus the prompt tokens with the highest
    pooled window attention, budget tokens in all, per KV head (GQA: the scores of a KV head's
    query heads are summed, so the heads that share a KV head share its selection)."""

    Options = SnapKVOptions
    name = Options.policy
    summary = "the observation window plus, per KV head, the prompt tokens the window attends to most (pooled)"

    def prompt_needs(self):
        return self.observation_window(self.options.window)

    def layer_budgets(self, budget: int, n: int) -> list[int]:
        """Per-layer budgets of a request with this budget and an n-token prompt."""
        return [budget] * self.shape.num_layers

    def resident_bound(self, budget, prompt_len):
        return min(max(self.layer_budgets(budget, prompt_len)), prompt_len)

    def rank(self, r, window, key_buffers):
        o = self.options
        budgets = self.layer_budgets(r.budget, r.seq_len)
        orders = [
            self.snap_order(r, layer, window, key_buffers, o.window, budgets[layer], o.kernel_size, o.pooling)
            for layer in range(self.shape.num_layers)
        ]
        return orders, budgets


class PyramidKVPolicy(SnapKVPolicy):
    """PyramidKV: SnapKV's ranking with per-layer budgets that fall linearly with depth
    (layer_budgets.pyramid); the mean over layers is the budget."""

    Options = PyramidKVOptions
    name = Options.policy
    summary = "SnapKV's ranking, budgets falling linearly with depth (first layer ~2x the mean)"

    def layer_budgets(self, budget, n):
        o = self.options
        if budget >= n:  # nothing to compress: the sequence grows evenly in every layer
            return [budget] * self.shape.num_layers
        window = min(o.window, n)
        return [window + b for b in pyramid(budget - window, self.shape.num_layers, o.beta, n - window)]
