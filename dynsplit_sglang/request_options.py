"""Per-request KV budget: `sampling_params={"custom_params": {"kv_budget": N}}`.

One server can then answer at several budgets, and requests that share a prompt share its prefill
through the radix cache (the accuracy benchmark sweeps budgets this way). The value is checked
where SGLang checks sampling parameters (a bad one is a request error naming it, nothing else is
affected), recorded by request id when the scheduler creates the request, and read once by the
attention backend when the request first runs.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Optional

from dynsplit_sglang.config import KVConfig, KVConfigError, check_budget_value

KEY = "kv_budget"
_MAX_PENDING = 65536  # requests recorded but never run (aborted in the queue) are dropped oldest first

_lock = threading.Lock()
_server: Optional[KVConfig] = None  # the server's --kv choice, in the process that checks requests
_context_length: Optional[int] = None
_enabled = False  # in the scheduler process: a compressing policy runs, so record budgets
_pending: "OrderedDict[str, int]" = OrderedDict()


def configure(kv: Optional[KVConfig], context_length: Optional[int]) -> None:
    """The server's KV choice (called where the server arguments are parsed)."""
    global _server, _context_length
    _server, _context_length = kv, context_length


def check(custom_params) -> None:
    """Raise ValueError naming the problem if custom_params.kv_budget is not usable."""
    if not isinstance(custom_params, dict) or KEY not in custom_params:
        return
    budget = custom_params[KEY]
    flag = f"custom_params.{KEY}"
    if _server is None or _server.policy == "full":
        raise ValueError(f"{flag} applies to a compressing policy; this server runs --kv full")
    try:
        check_budget_value(budget, flag)
        if _context_length is not None and budget > _context_length:
            raise KVConfigError(f"{flag} {budget} is larger than the model's context length ({_context_length})")
        _server.options.check_budget(budget, flag)
    except KVConfigError as e:
        raise ValueError(str(e)) from None


def enable(kv: KVConfig) -> None:
    """The attention backend of a compressing policy runs in this process."""
    global _enabled
    _enabled = kv.policy != "full"


def record(rid: str, custom_params) -> None:
    if not _enabled or not isinstance(custom_params, dict) or custom_params.get(KEY) is None:
        return
    with _lock:
        _pending[rid] = int(custom_params[KEY])
        while len(_pending) > _MAX_PENDING:
            _pending.popitem(last=False)


def take_budget(rid) -> Optional[int]:
    """The budget a request asked for (once; the backend remembers it for the request's life)."""
    with _lock:
        return _pending.pop(rid, None)
