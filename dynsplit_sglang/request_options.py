"""Per-request KV options: `sampling_params={"custom_params": {"kv_budget": N, "kv_policy": L}}`.

kv_budget: the request's own budget, instead of the server's --kv-budget.
kv_policy: which of the server's policies answers it: the --kv policy's name (the default) or a
           label of --kv-variants.
kv_evict:  true/false: free the prompt KV its policy will not read again (dynsplit_sglang/eviction.py),
           instead of the policy's `evict` option; only for policies that evict (the decode-time ones
           only where the server started with their `evict` on).

One server can then answer at several budgets and with several policies, and requests that share
a prompt share its prefill through the radix cache (the accuracy benchmark sweeps budgets and
policies this way). The values are checked where SGLang checks sampling parameters (a bad one is
a request error naming it, nothing else is affected), recorded by request id when the scheduler
creates the request, and read by the attention backend each time the request gets a
req_to_token row: when it first runs, and again if SGLang retracts it and prefills it later.
They live as long as SGLang's request object; a later request with the same id brings its own.

The same record gives the backend the request's prompt length (`prompt_len`): a request SGLang
retracted prefills its prompt and the tokens it had generated, and the prefill-time policies rank
the prompt alone.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

from dynsplit_sglang.config import KVConfig, KVConfigError, check_budget_value
from dynsplit_sglang.policies.dynsplit import ResidentOptions

BUDGET_KEY = "kv_budget"
POLICY_KEY = "kv_policy"
EVICT_KEY = "kv_evict"
KEYS = (BUDGET_KEY, POLICY_KEY, EVICT_KEY)

_lock = threading.Lock()
_server: KVConfig | None = None  # the server's --kv choice, in the process that checks requests
_context_length: int | None = None
_enabled = False  # in the scheduler process: a compressing policy runs, so record the options
# rid -> (weak reference to SGLang's Req, its options); the entry goes when the Req does
_recorded: dict[str, tuple[weakref.ref, RequestOptions]] = {}


@dataclass(frozen=True)
class RequestOptions:
    """What a request asked for; None: the server's default."""

    budget: int | None = None
    policy: str | None = None
    evict: bool | None = None


def configure(kv: KVConfig | None, context_length: int | None) -> None:
    """The server's KV choice (called where the server arguments are parsed)."""
    global _server, _context_length
    _server, _context_length = kv, context_length


def check(custom_params) -> None:
    """Raise ValueError naming the problem if custom_params.kv_budget, kv_policy or kv_evict is not
    usable, or a kv_ key is none of them (a misspelt option would otherwise be ignored; other keys
    belong to other custom_params users, such as custom logit processors)."""
    if not isinstance(custom_params, dict):
        return
    unknown = sorted(k for k in custom_params if isinstance(k, str) and k.startswith("kv_") and k not in KEYS)
    if unknown:
        raise ValueError(f"unknown custom_params key {unknown[0]!r}; the KV options are {', '.join(KEYS)}")
    if not (set(KEYS) & custom_params.keys()):
        return
    given = [f"custom_params.{k}" for k in KEYS if k in custom_params]
    if _server is None or _server.policy == "full":
        raise ValueError(f"{given[0]} applies to a compressing policy; this server runs --kv full")
    label = custom_params.get(POLICY_KEY, _server.policy)
    policies = _server.policies
    if label not in policies:
        raise ValueError(
            f"custom_params.{POLICY_KEY} {label!r} is not a policy of this server; it runs "
            f"{', '.join(repr(p) for p in policies)} (add more with --kv-variants)"
        )
    if EVICT_KEY in custom_params:
        evict = custom_params[EVICT_KEY]
        if not isinstance(evict, bool):
            raise ValueError(f"custom_params.{EVICT_KEY} must be true or false, got {evict!r}")
        options = policies[label]
        if evict and not hasattr(options, "evict"):
            raise ValueError(f"custom_params.{EVICT_KEY}: policy {label!r} does not evict KV")
        if evict and isinstance(options, ResidentOptions) and not options.evict:
            # its resident set is ranked with prompt queries the server collects only when evict is on
            raise ValueError(
                f"custom_params.{EVICT_KEY}: policy {label!r} evicts only when the server starts with it on "
                f"(--kv-config '{{\"evict\": true}}'); it can then be turned off per request"
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


def record(req) -> None:
    """SGLang created this request (a `Req`): remember it and its options for its life (a
    later request with the same id replaces it)."""
    if not _enabled:
        return
    rid = req.rid
    with _lock:
        _recorded[rid] = (weakref.ref(req, lambda ref, rid=rid: _forget(rid, ref)), asked(req))


def asked(req) -> RequestOptions:
    """What an SGLang request's custom_params ask for (checked when the request came in)."""
    custom_params = getattr(req.sampling_params, "custom_params", None)
    params = custom_params if isinstance(custom_params, dict) else {}
    budget, evict = params.get(BUDGET_KEY), params.get(EVICT_KEY)
    return RequestOptions(None if budget is None else int(budget), params.get(POLICY_KEY), evict)


def options(rid) -> RequestOptions:
    """What the request with this id asked for (the server's defaults if nothing)."""
    with _lock:
        entry = _recorded.get(rid)
    return entry[1] if entry else RequestOptions()


def request(rid):
    """The live SGLang request with this id (its `Req`), or None."""
    with _lock:
        entry = _recorded.get(rid)
    return entry[0]() if entry else None


def prompt_len(rid) -> int | None:
    """Tokens of the live request's prompt (SGLang's origin_input_ids, as the scheduler left
    them: it may cut an overlong prompt after creating the request); None if unknown."""
    with _lock:
        entry = _recorded.get(rid)
    req = entry[0]() if entry else None
    ids = getattr(req, "origin_input_ids", None)
    return None if ids is None else len(ids)


def _forget(rid: str, ref: weakref.ref) -> None:
    with _lock:
        if rid in _recorded and _recorded[rid][0] is ref:  # not a later request with the same id
            del _recorded[rid]
