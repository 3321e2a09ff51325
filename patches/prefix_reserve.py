"""A radix-cache hit recomputes at least the prompt's last `reserve` tokens.

Prefill-time policies (SnapKV, DynamicKV, ...) rank the prompt with the queries of its last
tokens. SGLang keeps keys and values in the cache, not queries, so a hit that left fewer than
`reserve` tokens to compute would rank with fewer queries than a miss. The hook lowers the longest
prefix a request may match from input_len - 1 (SGLang's own limit) to input_len - reserve; the
matched prefix is still reused, only the last tokens are recomputed.
"""

from __future__ import annotations

from sglang.srt.plugins.hook_registry import HookType

_reserve = 0


def set_reserve(tokens: int) -> None:
    """Called by the attention backend, in the scheduler process, with its policy's window."""
    global _reserve
    _reserve = max(0, int(tokens))


def limit_prefix(original, req, input_len: int, *args, **kwargs) -> int:
    limit = original(req, input_len, *args, **kwargs)
    if _reserve:
        limit = max(0, min(limit, input_len - _reserve))
    return limit


HOOKS = [("sglang.srt.managers.schedule_batch.Req._compute_max_prefix_len", HookType.AROUND, limit_prefix)]
