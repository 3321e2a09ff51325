"""Quest: fixed pages with per-channel key min/max, the top pages re-selected every decode step.

Quest is DynSplit-KV with rigid blocks: the same block records, scoring (the upper bound
sum_d max(q_d kmin_d, q_d kmax_d)) and budget-filling selection, with blocks cut every `page_size`
tokens and no sink or recent window beyond the unfinished page (as in Quest). Quest counts its
budget in whole pages with the unfinished one among them; here the budget is in tokens and the
last page in score order is cut to fill it, so both attend to about the same number of tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from dynsplit_sglang.config import KVConfigError, check_int, option
from dynsplit_sglang.policies.dynsplit import DynSplitOptions, DynSplitPolicy, ResidentOptions


@dataclass(frozen=True)
class QuestOptions(ResidentOptions):
    """Quest's options (`--kv quest --kv-config '{"page_size": 16}'`)."""

    policy: ClassVar[str] = "quest"
    page_size: int = option(16, "tokens per page (Quest: 16)")
    dense_layers: int = option(
        0, "the first layers attend to everything (Quest's paper: 2); 0 so that every layer honours the budget"
    )

    def validate(self) -> None:
        super().validate()
        check_int("page_size", self.page_size, 1)
        check_int("dense_layers", self.dense_layers, 0)
        if self.evict and self.dense_layers:
            raise KVConfigError(
                "--kv-config: 'dense_layers' needs 'evict' false (a dense layer reads the whole prompt, "
                'which eviction, on by default, frees); add "evict": false'
            )

    def min_budget(self) -> int:
        return self.page_size  # the open (unfinished) page is always attended

    def budget_floor_reason(self) -> str:
        return f"every step keeps the unfinished page (up to {self.page_size} tokens)"


class QuestPolicy(DynSplitPolicy):
    Options = QuestOptions
    name = Options.policy
    summary = "Quest: the best fixed pages by the min/max upper bound, re-selected every step, plus the unfinished page"

    def __init__(self, kv, shape, num_slots, dtype, device, tokens=None):
        super().__init__(kv, shape, num_slots, dtype, device, tokens)
        self.dense_layers = self.options.dense_layers

    def block_rules(self) -> DynSplitOptions:
        """Pages: blocks of exactly `page_size` tokens, nothing kept beyond the unfinished page."""
        return DynSplitOptions(
            block_size=self.options.page_size,
            delta=0,
            split="fixed_interval",
            candidates="all",
            sink_tokens=0,
            recent_tokens=0,
        )
