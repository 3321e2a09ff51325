"""Eviction: the prompt KV a compressing request will never read again goes back to SGLang's pool.

A prefill-time policy ranks a request's prompt when its last token is computed; from then on each
(layer, KV head) reads at most `resident_bound` of its prompt tokens, best first, plus the
generated ones. With eviction on, the backend then *compacts* the request's private part: the
kept tokens at or after its radix hit (`prefix`, the shared part, stays where it is) are copied,
per layer and KV head and in rank order, into the slots of the prompt's last positions
[start, prompt_end), start = max(prefix, prompt_end - resident_bound) on a page boundary (keys
are stored after RoPE, so a token's position need not survive). The policy then reads the same
keys and values in the same order as without eviction, so the outputs are identical.

Nothing in [prefix, start) is read again, and SGLang gets it back:
- radix cache on: it goes into the tree untouched (SGLang's own insert, capped at `start`), and
  the request's lock shrinks back to its hit [0, prefix), which it still reads. The tree evicts
  the rest (LRU) when the pool needs room, admission counts it as free, and a later request
  with the same prefix (the next turn of a conversation) still gets the hit.
- radix cache off: it is freed at once.

A shared prefix (an agent's system prompt) is never moved, rewritten or unlocked by a request
that hit it. [start, prompt_end) is private: no insert goes past `start` (patches/evict_kv.py),
so no tree node points at a compacted slot. SGLang's release frees [start, end) when the request
finishes, is aborted or retracted, as it frees any private KV.

The backend decides `start` at the request's first forward (when its hit is known) and records
it here (`EvictionPlan.begin`) before any of the request's KV goes into the tree; the radix-cache
hook reads it from here.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from dynsplit_sglang import metrics, request_options
from dynsplit_sglang.policies.base import forget_rows


@dataclass
class Eviction:
    """The eviction of one request in its req_to_token row.

    prefix:    its radix hit when it came in: [0, prefix) is shared, read in place, kept locked.
    start:     where its compacted private prompt goes: [start, prompt_end).
    anchor:    the tree node its hit ended on (set at its first insert; its lock returns there).
    compacted: the backend moved the kept tokens (the prompt's last forward ran).
    published: the tree and the pool were told (patches/evict_kv.py): [prefix, start) is no longer
               the request's, and nothing more of it goes into the tree.
    gap_end:   for a policy whose positions close up after compaction (the decode-time ones): its
               kept tokens are [gap_end, prompt_end) and the request's sequence, as the backend
               shows it to the policy, leaves [prefix, gap_end) out (`view`); None: positions stay.
    policy:    its policy's label (for the metrics).
    """

    rid: str | None
    generation: int  # SGLang's allocation count of the row (a later request in it has another)
    prefix: int
    start: int
    anchor: Any = None
    anchored: bool = False
    compacted: bool = False
    published: bool = False
    gap_end: int | None = None
    policy: str = ""

    def view(self, row_slots: torch.Tensor) -> torch.Tensor:
        """The request's KV slots [n - gap] as its policy reads them: the hit, then from gap_end on."""
        if self.gap_end is None:
            return row_slots
        return torch.cat([row_slots[: self.prefix], row_slots[self.gap_end :]])

    @property
    def gap(self) -> int:
        return 0 if self.gap_end is None else self.gap_end - self.prefix


class EvictionPlan:
    """Which requests evict, from where (one per scheduler process).

    bounds: policy label -> resident_bound(budget, prompt_len) of that policy (None: it does not
            evict); evict: label -> its `evict` option; default: the --kv policy's label.
    min_kept: the prompt's last tokens that stay where they are whatever the policy keeps: a
            hybrid model's sliding-window layers read them (their window), 0 without such layers.
    """

    def __init__(
        self,
        bounds: dict[str, Callable[[int, int], int | None]],
        evict: dict[str, bool],
        default: str,
        budget: int,
        page_size: int,
        min_kept: int = 0,
    ):
        self.bounds, self.evict, self.default = bounds, evict, default
        self.min_kept = min_kept
        self.budget, self.page_size = budget, max(1, page_size)
        self._lock = threading.Lock()
        self._rows: dict[int, Eviction] = {}
        self.published = 0  # requests whose private prompt was compacted and given back, ever
        self.released = 0  # tokens of private prompt given back (to the tree or the pool), ever
        self._seen = 0  # `released` when the scheduler last asked (newly_released)

    def evicts(self, label: str | None, asked: bool | None) -> bool:
        """Whether eviction is on for a request of this policy (custom_params.kv_evict, else the
        policy's `evict` option) and the policy can evict."""
        label = label or self.default
        on = self.evict.get(label, False) if asked is None else asked
        return on and self.bounds.get(label) is not None

    def start(self, label: str | None, budget: int, prompt_len: int, asked: bool | None, prefix: int) -> int | None:
        """Where a request's kept private prompt tokens go (a page boundary after its hit `prefix`),
        or None if it keeps its KV (eviction off, a policy that does not evict, or a private part
        that is no longer than what would be kept)."""
        if not self.evicts(label, asked) or budget >= prompt_len:
            return None
        bound = self.bounds[label or self.default]
        kept = bound(budget, prompt_len)
        if kept is None:
            return None
        kept = max(kept, self.min_kept)
        start = (prompt_len - kept) // self.page_size * self.page_size
        return start if start > prefix else None

    def of_request(self, req, prefix: int) -> tuple[bool, int | None]:
        """(evicts, start) of a live SGLang request whose radix hit is `prefix` tokens (its
        custom_params as request_options checked them)."""
        if getattr(req, "session_id", None) is not None:
            return False, None  # a streaming session keeps its row for the next turn: not ours to compact
        asked = request_options.asked(req)
        budget = self.budget if asked.budget is None else asked.budget
        start = self.start(asked.policy, budget, len(req.origin_input_ids), asked.evict, prefix)
        return self.evicts(asked.policy, asked.evict), start

    # --- requests that evict ----------------------------------------------------------------------
    def begin(self, row: int, generation: int, rid: str | None, prefix: int, start: int, policy: str = "") -> Eviction:
        with self._lock:
            self._rows[row] = Eviction(rid, generation, prefix, start, policy=policy)
            return self._rows[row]

    def of(self, row: int, generation: int, rid: str | None) -> Eviction | None:
        """The eviction of the request now in this row, if it evicts."""
        with self._lock:
            ev = self._rows.get(row)
        if ev is None or ev.generation != generation or ev.rid != rid:
            return None
        return ev

    def publish(self, ev: Eviction) -> None:
        """The request's [prefix, start) went to SGLang (patches/evict_kv.py)."""
        with self._lock:
            ev.published = True
            self.published += 1
            self.released += ev.start - ev.prefix
        metrics.evicted(ev.policy or self.default, ev.start - ev.prefix)

    def newly_released(self) -> bool:
        """Whether requests gave KV back since the last call (patches/evict_kv.py)."""
        with self._lock:
            new, self._seen = self.released != self._seen, self.released
        return new

    def stats(self) -> dict:
        return {"evicting": len(self._rows), "evicted_requests": self.published, "evicted_tokens": self.released}

    def forget(self, rows: set[int]) -> None:
        """These rows' requests left them (finished, aborted or retracted)."""
        with self._lock:
            forget_rows(self._rows, rows)

    def reset(self) -> None:
        with self._lock:
            self._rows.clear()

    def __len__(self) -> int:
        return len(self._rows)


def compacted_positions(kept: torch.Tensor, prefix: int, start: int, end: int) -> torch.Tensor | None:
    """Where a request's kept prompt tokens are read after compaction.

    kept: [L, KvH, K] int64 positions each layer and KV head reads, in its order (-1: none).
    returns the same with every private position (>= prefix) replaced by start + its place among
    that layer's and head's private ones (the shared ones stay), or None if those do not fit in
    [start, end).
    """
    private = kept >= prefix
    place = private.cumsum(dim=2) - 1
    if int(place.max()) >= end - start:
        return None
    return torch.where(private, start + place, kept)


def move_kv(buffers, row_slots: torch.Tensor, kept: torch.Tensor, moved: torch.Tensor) -> None:
    """Copy one layer's kept KV to where `compacted_positions` put it.

    buffers: that layer's key and value buffers, each [slots, KvH, D]; row_slots: [n] the
    request's slot of each position; kept, moved: [KvH, K] positions before and after.
    """
    change = moved != kept
    heads = torch.arange(kept.shape[0], device=kept.device)[:, None].expand_as(kept)[change]
    src, dst = row_slots[kept[change]], row_slots[moved[change]]
    for buffer in buffers:
        buffer[dst, heads] = buffer[src, heads]  # gathered first: sources may lie among the targets


_plan: EvictionPlan | None = None


def install(plan: EvictionPlan | None) -> None:
    """The attention backend's plan, for the hooks in the same (scheduler) process."""
    global _plan
    _plan = plan


def current() -> EvictionPlan | None:
    return _plan
