"""Keep SGLang's radix cache off compacted KV, and give the rest of the private prompt back
(dynsplit_sglang/eviction.py explains the design).

UnifiedRadixCache.checkpoint (around) is where SGLang publishes a request's KV into the tree: the
chunks of a chunked prefill as they finish, the prompt after prefill, the whole sequence when the
request finishes. For a request that evicts (the backend began an `Eviction` for it at its first
forward, before any checkpoint):
- every insert stops at `start`: [start, prompt_end) will hold (or holds) compacted KV, private
  to the request;
- the first checkpoint after the backend compacted the prompt publishes it: [prefix, start) goes
  into the tree (or, radix cache off, is freed); the request's lock goes back to the node its own
  radix hit ended on, so the tree may evict [prefix, start) when it needs room while the shared
  [0, prefix) the request still reads stays locked; the row's entries in [prefix, start) are
  zeroed, so nothing reads them as this request's;
- after that nothing more goes into the tree (the compacted prompt and the tokens generated from
  it are not the prompt's KV); SGLang's release frees [start, end) as usual.

Scheduler.get_new_batch_prefill (before): once a waiting request did not fit, SGLang stops trying
to admit (`batch_is_full`) until a running request leaves; eviction frees KV while every request
stays, so after it gave some back the scheduler tries again.
"""

from __future__ import annotations

import logging

from sglang.srt.plugins.hook_registry import HookType

from dynsplit_sglang import eviction

logger = logging.getLogger(__name__)

TARGET = "sglang.srt.mem_cache.unified_radix_cache.UnifiedRadixCache.checkpoint"


def checkpoint_below_start(original, cache, req, *args, up_to: int, **kwargs):
    plan = eviction.current()
    row = req.kv.req_pool_idx
    ev = (
        None if plan is None or row is None else plan.of(row, int(cache.req_to_token_pool.req_generation[row]), req.rid)
    )
    if ev is None:
        return original(cache, req, *args, up_to=up_to, **kwargs)
    if ev.published:
        return None
    if not ev.anchored:  # the request's first insert: its lock still sits where its hit ended
        ev.anchor, ev.anchored = req.last_node, True
    keep = cache.lock(ev.anchor) if ev.compacted and ev.prefix > 0 else None
    result = original(cache, req, *args, up_to=min(up_to, ev.start), **kwargs)
    if ev.compacted:
        _publish(cache, req, ev, keep)
        plan.publish(ev)
    return result


def _publish(cache, req, ev: eviction.Eviction, keep) -> None:
    kv = req.kv
    protected = kv.cache_protected_len
    if protected > ev.start:  # cannot happen: every insert stops at start
        logger.error(
            "dynsplit-sglang: request %s: the radix cache holds %d tokens past the compacted start %d",
            req.rid,
            protected,
            ev.start,
        )
    elif protected < ev.start:  # what the tree did not take (radix cache off, a partial page)
        cache.free_kv_row(kv, [(protected, ev.start)])
        kv.cache_protected_len = ev.start
    cache.unlock(req.lock)  # the insert moved it to `start`; keep only the hit the request reads
    req.lock, req.last_node = keep, ev.anchor
    cache.req_to_token_pool.req_to_token[kv.req_pool_idx, ev.prefix : ev.start] = 0


def admit_after_eviction(scheduler, running_batch, *args, **kwargs):
    plan = eviction.current()
    if plan is not None and plan.newly_released():
        running_batch.batch_is_full = False


HOOKS = [
    (TARGET, HookType.AROUND, checkpoint_below_start),
    ("sglang.srt.managers.scheduler.Scheduler.get_new_batch_prefill", HookType.BEFORE, admit_after_eviction),
]
