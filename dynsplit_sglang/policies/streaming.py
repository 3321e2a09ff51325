"""Position-only baselines: StreamingLLM (sink + recent) and SepLLM (initial + separators + recent)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch

from dynsplit_sglang.config import check_int, option
from dynsplit_sglang.delimiters import is_separator_text
from dynsplit_sglang.policies.prefill_selection import PrefillOptions, PrefillSelectionPolicy, SlotFlags

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamingLLMOptions(PrefillOptions):
    """StreamingLLM's options (`--kv streamingllm`)."""

    policy: ClassVar[str] = "streamingllm"
    sink_tokens: int = option(4, "first tokens always kept (the attention sink)")

    def validate(self) -> None:
        super().validate()
        check_int("sink_tokens", self.sink_tokens, 0)

    def min_budget(self) -> int:
        return self.sink_tokens + 1

    def budget_floor_reason(self) -> str:
        return f"the {self.sink_tokens} sink tokens and at least one recent token are kept"


@dataclass(frozen=True)
class SepLLMOptions(PrefillOptions):
    """SepLLM's options (`--kv sepllm`)."""

    policy: ClassVar[str] = "sepllm"
    initial_tokens: int = option(4, "a, the first tokens always kept (SepLLM: 4)")
    recent_tokens: int | None = option(None, "w, the recent window; `null` = half the budget (SepCache: 256 of 512)")

    def validate(self) -> None:
        super().validate()
        check_int("initial_tokens", self.initial_tokens, 0)
        if self.recent_tokens is not None:
            check_int("recent_tokens", self.recent_tokens, 1)

    def recent(self, budget: int) -> int:
        return budget // 2 if self.recent_tokens is None else self.recent_tokens

    def min_budget(self) -> int:
        return self.initial_tokens + (self.recent_tokens or 1) + 1

    def budget_floor_reason(self) -> str:
        return "the initial tokens, the recent window and at least one separator must fit"


def _same_for_all(order: torch.Tensor, num_layers: int, num_kv_heads: int) -> list[torch.Tensor]:
    return [order[None, :].expand(num_kv_heads, -1)] * num_layers


class StreamingLLMPolicy(PrefillSelectionPolicy):
    """StreamingLLM: the first `sink_tokens` plus the most recent tokens, budget in all, the same
    for every layer and head. As tokens are generated the window rolls (generated tokens push out
    the oldest prompt tokens); positions stay the original ones (no re-indexing inside the cache)."""

    Options = StreamingLLMOptions
    name = Options.policy
    summary = "the first tokens (attention sink) and the most recent ones"

    def rank(self, r, window, key_buffers):
        n, device = r.seq_len, r.row_slots.device
        sink = min(self.options.sink_tokens, n)
        order = torch.cat([torch.arange(sink, device=device), torch.arange(n - 1, sink - 1, -1, device=device)])
        order = order[: min(n, r.budget)]
        return _same_for_all(order, self.shape.num_layers, self.shape.num_kv_heads), [r.budget] * self.shape.num_layers


class SepLLMPolicy(PrefillSelectionPolicy):
    """SepLLM (training-free): the `initial_tokens`, the recent window, and separator tokens
    (`. , ? ! ; :`, whitespace, line breaks) in between, the newest separators first while they fit
    in the budget. The same for every layer and head. Generated tokens push out the oldest
    separators first."""

    Options = SepLLMOptions
    name = Options.policy
    summary = (
        "initial tokens, separator tokens (`. , ? ! ; :`, whitespace, line breaks; newest first) and a recent window"
    )

    def __init__(self, kv, shape, num_slots, dtype, device, tokens=None):
        super().__init__(kv, shape, num_slots, dtype, device, tokens)
        mask = None if tokens is None else tokens.mask(is_separator_text)
        if mask is None:
            logger.warning("sepllm: no tokenizer, so no token counts as a separator")
        self.separators = SlotFlags(num_slots, mask, device)

    def record_tokens(self, reqs):
        self.separators.record(reqs)

    def rank(self, r, window, key_buffers):
        n, device = r.seq_len, r.row_slots.device
        first = min(self.options.initial_tokens, n)
        recent_from = max(first, n - self.options.recent(r.budget))
        middle = torch.arange(first, recent_from, device=device)
        seps = middle[self.separators.of(r.row_slots[first:recent_from])].flip(0)  # newest first
        order = torch.cat(
            [
                torch.arange(first, device=device),
                torch.arange(n - 1, recent_from - 1, -1, device=device),
                seps,
            ]
        )[: r.budget]
        return _same_for_all(order, self.shape.num_layers, self.shape.num_kv_heads), [r.budget] * self.shape.num_layers
