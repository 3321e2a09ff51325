"""WindowKV: whole windows of consecutive prompt tokens, selected once per group of layers."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch

from dynsplit_sglang.config import check_choice, check_int, option
from dynsplit_sglang.layer_budgets import group_pyramid
from dynsplit_sglang.policies.base import PolicyNeeds
from dynsplit_sglang.policies.prefill_selection import PrefillOptions, PrefillSelectionPolicy, SlotFlags, prompt_scores

logger = logging.getLogger(__name__)

WINDOW_RULES = ("auto", "max", "mean")


@dataclass(frozen=True)
class WindowKVOptions(PrefillOptions):
    """WindowKV's options (`--kv windowkv`). The authors pick the scoring rule with a fine-tuned
    BERT classifier that is not available offline; `rule` "auto" uses "max" when the end of the
    prompt asks a question (a '?' among its last `suffix_max` tokens), else "mean"."""

    policy: ClassVar[str] = "windowkv"
    review_window: int = option(8, "W, tokens per window (WindowKV: 8)")
    shared_layers: int = option(8, "G, layers per group that share the selected windows (WindowKV: 8)")
    suffix_max: int = option(32, 'observation suffix of the "max" rule: localization, QA (WindowKV: 32)')
    suffix_mean: int = option(16, 'observation suffix of the "mean" rule: aggregation (WindowKV: 16)')
    beta: int = option(14, "pyramid ratio of the group budgets (WindowKV: 14)")
    rule: str = option("auto", '`"max"`, `"mean"`, or `"auto"`: "max" when a `?` ends the prompt, else "mean"')

    def validate(self) -> None:
        super().validate()
        for name in ("review_window", "shared_layers", "suffix_max", "suffix_mean", "beta"):
            check_int(name, getattr(self, name), 1)
        check_choice("rule", self.rule, WINDOW_RULES)

    @property
    def max_suffix(self) -> int:
        return max(self.suffix_max, self.suffix_mean)

    def min_budget(self) -> int:
        return self.max_suffix + self.review_window

    def budget_floor_reason(self) -> str:
        return (
            f"the observation suffix (up to {self.max_suffix}) is always kept plus at least one window of "
            f"{self.review_window}"
        )


def window_scores_by_rule(token_scores: torch.Tensor, size: int, rule: str) -> torch.Tensor:
    """One score per window of `size` consecutive tokens, shared by all heads.

    token_scores: [heads, P] observation-window attention of positions 0 .. P-1.
    rule "mean" (aggregation tasks): mean over heads and the window's tokens;
    rule "max" (localization tasks): per head the mean of the window's top size//2 tokens, then
    the mean over heads. returns [ceil(P / size)] fp32 (the last window may be partial).
    """
    heads, p = token_scores.shape
    num = -(-p // size)
    padded = torch.full((heads, num * size), float("nan"), device=token_scores.device)
    padded[:, :p] = token_scores
    windows = padded.view(heads, num, size)
    if rule == "mean":
        return windows.nanmean(dim=(0, 2))
    top = windows.nan_to_num(float("-inf")).topk(max(1, size // 2), dim=2).values
    return top.masked_fill(torch.isinf(top), float("nan")).nanmean(dim=2).mean(dim=0)


class WindowKVPolicy(PrefillSelectionPolicy):
    """WindowKV: the first layer of every group of `shared_layers` scores the prompt's windows with
    its observation suffix; the group keeps the suffix plus the best windows that fit its budget
    (a pyramid over groups, mean = budget), the same for all heads and all layers of the group."""

    Options = WindowKVOptions
    name = Options.policy
    summary = (
        "the observation suffix plus whole 8-token windows, scored once per group of 8 layers and shared by its "
        "heads and layers; group budgets form a pyramid"
    )

    def __init__(self, kv, shape, num_slots, dtype, device, tokens=None):
        super().__init__(kv, shape, num_slots, dtype, device, tokens)
        mask = None if tokens is None else tokens.mask(lambda text: "?" in text)
        if mask is None and self.options.rule == "auto":
            logger.warning("windowkv: no tokenizer, so rule 'auto' always picks 'mean'")
        self.questions = SlotFlags(num_slots, mask, device)

    def prompt_needs(self) -> PolicyNeeds:
        """The suffix queries of the first layer of every group."""
        groups = frozenset(range(0, self.shape.num_layers, self.options.shared_layers))
        return PolicyNeeds(query_layers=groups, query_window=self.options.max_suffix)

    def record_tokens(self, reqs):
        self.questions.record(reqs)

    def rule_for(self, r) -> str:
        """The scoring rule: the option, or for "auto" "max" when the prompt ends with a question."""
        if self.options.rule != "auto":
            return self.options.rule
        tail = r.row_slots[max(0, r.seq_len - self.options.suffix_max) : r.seq_len]
        return "max" if bool(self.questions.of(tail).any()) else "mean"

    def resident_bound(self, budget, prompt_len):
        """The largest group budget of either rule (which one a prompt gets depends on its text)."""
        o, n = self.options, prompt_len
        if budget >= n:
            return n
        largest = 0
        for suffix in (o.suffix_max, o.suffix_mean):
            s = min(n, suffix)
            largest = max(
                largest, s + max(group_pyramid(budget - s, self.shape.num_layers, o.shared_layers, o.beta, n - s))
            )
        return min(n, largest)

    def rank(self, r, window, key_buffers):
        o = self.options
        n, device, num_layers = r.seq_len, r.row_slots.device, self.shape.num_layers
        rule = self.rule_for(r)
        s = min(n, o.suffix_max if rule == "max" else o.suffix_mean)
        p = n - s
        suffix = torch.arange(n - 1, p - 1, -1, device=device)
        if r.budget >= n:
            budgets, review = [r.budget] * num_layers, [p] * num_layers
        else:
            review = group_pyramid(r.budget - s, num_layers, o.shared_layers, o.beta, p)
            budgets = [s + b for b in review]
        orders = []
        for first in range(0, num_layers, o.shared_layers):
            kept = torch.zeros(0, dtype=torch.int64, device=device)
            if p > 0:
                token_scores = prompt_scores(r, first, window, key_buffers, s)[:, :p]
                scores = window_scores_by_rule(token_scores, o.review_window, rule)
                starts = torch.arange(0, p, o.review_window, device=device)
                lengths = (p - starts).clamp_max(o.review_window)
                best = torch.argsort(scores, descending=True, stable=True)
                chosen = best[torch.cumsum(lengths[best], 0) <= review[first]]
                kept = torch.cat(
                    [torch.arange(int(starts[w]), int(starts[w] + lengths[w]), device=device) for w in chosen.tolist()]
                    or [kept]
                )
            order = torch.cat([suffix, kept])[None, :].expand(self.shape.num_kv_heads, -1)
            orders += [order] * min(o.shared_layers, num_layers - first)
        return orders, budgets
