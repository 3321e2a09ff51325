"""WindowKV: whole windows of consecutive prompt tokens, selected once per group of layers."""

from __future__ import annotations

import logging

import torch

from dynsplit_sglang.layer_budgets import group_pyramid
from dynsplit_sglang.policies.prefill_selection import PrefillSelectionPolicy, SlotFlags, prompt_scores

logger = logging.getLogger(__name__)


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

    name = "windowkv"

    def __init__(self, kv, shape, num_slots, dtype, device, tokens=None):
        super().__init__(kv, shape, num_slots, dtype, device, tokens)
        mask = None if tokens is None else tokens.mask(lambda text: "?" in text)
        if mask is None and self.options.rule == "auto":
            logger.warning("windowkv: no tokenizer, so rule 'auto' always picks 'mean'")
        self.questions = SlotFlags(num_slots, mask, device)

    def query_window(self) -> int:
        return self.options.max_suffix

    def query_layers(self) -> frozenset[int]:
        return frozenset(range(0, self.shape.num_layers, self.options.shared_layers))

    def record_tokens(self, reqs):
        self.questions.record(reqs)

    def rule_for(self, r) -> str:
        """The scoring rule: the option, or for "auto" "max" when the prompt ends with a question."""
        if self.options.rule != "auto":
            return self.options.rule
        tail = r.row_slots[max(0, r.seq_len - self.options.suffix_max) : r.seq_len]
        return "max" if bool(self.questions.of(tail).any()) else "mean"

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
                kept = torch.cat([torch.arange(int(starts[w]), int(starts[w] + lengths[w]), device=device) for w in chosen.tolist()] or [kept])
            order = torch.cat([suffix, kept])[None, :].expand(self.shape.num_kv_heads, -1)
            orders += [order] * min(o.shared_layers, num_layers - first)
        return orders, budgets
