"""Per-request KV options: `sampling_params={"custom_params": {"kv_budget": N, "kv_policy": L}}`.

kv_budget: the request's own budget, instead of the server's --kv-budget.
kv_policy: which of the server's policies answers it: the --kv policy's name (the default) or a
           label of --kv-variants.

One server can then answer at several budgets and with several policies, and requests that share
a prompt share its prefill through the radix cache (the accuracy benchmark sweeps budgets and
policies this way). The values are checked where SGLang checks sampling parameters (a bad one is
a request error naming it, nothing else is affected), recorded by request id when the scheduler
creates the request, and read once by the attention backend when the request first runs.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

from dynsplit_sglang.config import KVConfig, KVConfigError, check_budget_value

BUDGET_KEY = "kv_budget"
POLICY_KEY = "kv_policy"
_MAX_PENDING = 65536  # requests recorded but never run (aborted in the queue) are dropped oldest first

_lock = threading.Lock()
_server: Optional[KVConfig] = None  # the server's --kv choice, in the process that checks requests
_context_length: Optional[int] = None
_enabled = False  # in the scheduler process: a compressing policy runs, so record the options
_pending: "OrderedDict[str, RequestOptions]" = OrderedDict()


@dataclass(frozen=True)
class RequestOptions:
    """What a request asked for; None: the server's default."""

    budget: Optional[int] = None
    policy: Optional[str] = None


def configure(kv: Optional[KVConfig], context_length: Optional[int]) -> None:
    """The server's KV choice (called where the server arguments are parsed)."""
    global _server, _context_length
    _server, _context_length = kv, context_length


def check(custom_params) -> None:
    """Raise ValueError naming the problem if custom_params.kv_budget or kv_policy is not usable."""
    if not isinstance(custom_params, dict) or not ({BUDGET_KEY, POLICY_KEY} & custom_params.keys()):
        return
    given = [f"custom_params.{k}" for k in (BUDGET_KEY, POLICY_KEY) if k in custom_params]
    if _server is None or _server.policy == "full":
        raise ValueError(f"{given[0]} applies to a compressing policy; this server runs --kv full")
    label = custom_params.get(POLICY_KEY, _server.policy)
    policies = _server.policies
    if label not in policies:
        raise ValueError(
            f"custom_params.{POLICY_KEY} {label!r} is not a policy of this server; it runs "
            f"{', '.join(repr(p) for p in policies)} (add more with --kv-variants)"
        )
    if BUDGET_KEY not in custom_params:
        return
    budget = custom_params[BUDGET_KEY]
    flag = f"custom_params.{BUDGET_KEY}"
    try:
        check_budget_value(budget, flag)
        if _context_length is not None and budget > _context_length:
            raise KVConfigError(f"{flag} {budget} is larger than the model's context length ({_context_length})")
        policies[label].check_budget(budget, flag)
    except KVConfigError as e:
        raise ValueError(str(e)) from None


def enable(kv: KVConfig) -> None:
    """The attention backend of a compressing policy runs in this process."""
    global _enabled
    _enabled = kv.policy != "full"


def record(rid: str, custom_params) -> None:
    if not _enabled or not isinstance(custom_params, dict):
        return
    budget, policy = custom_params.get(BUDGET_KEY), custom_params.get(POLICY_KEY)
    if budget is None and policy is None:
        return
    with _lock:
        _pending[rid] = RequestOptions(None if budget is None else int(budget), policy)
        while len(_pending) > _MAX_PENDING:
            _pending.popitem(last=False)


def take(rid) -> RequestOptions:
    """What a request asked for (once; the backend remembers it for the request's life)."""
    with _lock:
        return _pending.pop(rid, None) or RequestOptions()
