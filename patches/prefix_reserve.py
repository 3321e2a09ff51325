"""A radix-cache hit recomputes at least the prompt's last `reserve` tokens.

Prefill-time policies (SnapKV, DynamicKV, ...) rank the prompt with the queries of its last
tokens. SGLang keeps keys and values in the cache, not queries, so a hit that left fewer than
`reserve` tokens to compute would rank with fewer queries than a miss. The hook lowers the longest
prefix a request may match from input_len - 1 (SGLang's own limit) to input_len - reserve; the
matched prefix is still reused, only the last tokens are recomputed.

The reserve is the query window of the policy that answers the request (its
`custom_params.kv_policy`, else the server's --kv policy), so in a server with --kv-variants a
request of DynSplit-KV or Quest (window 0) does not pay SnapKV's window.

The window ends where the prompt ends. A request SGLang retracted prefills its prompt and the
tokens it had generated (input_len counts both), and the prefill-time policies rank its prompt
alone, with the same queries as the first time: its match stops `reserve` tokens (at least one)
before the prompt's end.
"""

from __future__ import annotations

from sglang.srt.plugins.hook_registry import HookType

_windows: dict[str, int] = {}  # policy label -> its query window
_default = ""  # label of the --kv policy


def set_reserve(windows: dict[str, int], default: str) -> None:
    """Called by the attention backend, in the scheduler process: every policy's query window
    by label, and the label of the policy a request without kv_policy gets."""
    global _windows, _default
    _windows = {label: max(0, int(w)) for label, w in windows.items()}
    _default = default


def reserve_of(req) -> int:
    """Tokens a radix hit of this request must recompute."""
    params = getattr(getattr(req, "sampling_params", None), "custom_params", None)
    label = params.get("kv_policy") if isinstance(params, dict) else None
    label = _default if label is None else label
    # A label the server does not run was refused when the request was checked; be safe anyway.
    return _windows[label] if label in _windows else max(_windows.values(), default=0)


def limit_prefix(original, req, input_len: int, *args, **kwargs) -> int:
    limit = original(req, input_len, *args, **kwargs)
    if not _windows:
        return limit  # --kv full: SGLang's own limit
    prompt_end = min(input_len, len(req.origin_input_ids))
    return max(0, min(limit, prompt_end - max(reserve_of(req), 1)))


HOOKS = [("sglang.srt.managers.schedule_batch.Req._compute_max_prefix_len", HookType.AROUND, limit_prefix)]
