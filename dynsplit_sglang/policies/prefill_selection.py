"""Prefill-time policies: rank the prompt once, when its last token is computed, then keep it.

SnapKV, PyramidKV, DynamicKV, WindowKV, StreamingLLM and SepLLM evict KV at the end of prefill in
their papers. Here nothing is evicted (the radix cache may share the KV with other requests):
each one *ranks* the prompt positions per layer and KV head, and every decode step attends to
the request's budget worth of them:

    generated tokens (all of them, newest first) + the best-ranked prompt tokens that still fit.

So a step never attends to more than the budget: as tokens are generated they push out the
lowest-ranked prompt tokens, as in a full fixed-size cache. With a budget covering the sequence
the step is dense (the backend's dense path).

The ranking uses the queries of the last prompt tokens (the observation window). They are
collected across chunked-prefill forwards, and a radix-cache hit recomputes at least the window
(patches/prefix_reserve.py), so chunking and caching cannot change a ranking. Only the forward
that computes the prompt's last token ranks. A request SGLang retracted prefills again with the
tokens it had generated; it is ranked over its prompt alone, with the same window, so those
tokens stay generated tokens. Rankings are kept per `req_to_token` row until the request leaves
it (PolicyHost releases the row at the next prefill).
"""

from __future__ import annotations

import abc
import logging
from dataclasses import dataclass

import torch

from dynsplit_sglang.config import KVConfigError, PolicyOptions, option
from dynsplit_sglang.kernels.window_scores import pool_scores, window_scores
from dynsplit_sglang.policies.base import KVPolicy, PolicyNeeds, RequestView, all_positions, forget_rows

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrefillOptions(PolicyOptions):
    """What every prefill-time policy's options share: whether the KV it will never read again is
    freed (dynsplit_sglang/eviction.py)."""

    evict: bool = option(
        True,
        "free the prompt KV no decode step will read: the kept tokens move into `budget` slots (per layer "
        "and KV head) and the rest goes back to SGLang's pool; `false`: keep it all resident",
    )

    def validate(self) -> None:
        if not isinstance(self.evict, bool):
            raise KVConfigError(f"--kv-config: 'evict' must be true or false, got {self.evict!r}")


class PromptQueries:
    """The last `window` queries of every request's prompt, per layer, across chunked prefill."""

    def __init__(self, window: int):
        self.window = window
        self._forward: list[dict[int, tuple[torch.Tensor, float]]] = []
        # row -> (rid, position after the carried queries, {layer: ([m, H, D] queries, scale)})
        self._carry: dict[int, tuple[str | None, int, dict]] = {}

    def begin(self, num_reqs: int) -> None:
        self._forward = [{} for _ in range(num_reqs)]

    def add(self, req_index: int, layer_id: int, q: torch.Tensor, scale: float) -> None:
        self._forward[req_index][layer_id] = (q.detach().clone(), scale)

    def take(self, req_index: int, r: RequestView) -> dict[int, tuple[torch.Tensor, float]]:
        """{layer: (queries [m, H, D] of prompt positions e-m .. e-1, scale)}, m <= window, where
        e = min(seq_len, prompt_end) is as far as the prompt is computed; joins what earlier
        chunks of the same request left and remembers the result for the next chunk."""
        new = self._forward[req_index]
        rid, end, old = self._carry.get(r.row, (None, -1, {}))
        if not new:  # this forward computed none of the prompt's last tokens
            return old if rid == r.rid else {}
        joined = {}
        for layer, (q, scale) in new.items():
            if rid == r.rid and end == r.new_start and layer in old and q.shape[0] < self.window:
                q = torch.cat([old[layer][0], q])[-self.window :]
            joined[layer] = (q, scale)
        self._carry[r.row] = (r.rid, min(r.seq_len, r.prompt_end), joined)
        return joined

    def end_prompt(self, rows) -> None:
        """These rows' requests are decoding: their prompts are complete, so no later chunk will
        join what was carried (a [window, H, D] clone per query layer and row)."""
        for row in rows:
            self._carry.pop(row, None)

    def __len__(self) -> int:
        """Rows whose queries are carried to a next chunk."""
        return len(self._carry)

    def release(self, free_rows: set[int]) -> None:
        forget_rows(self._carry, free_rows)

    def reset(self) -> None:
        self._carry.clear()


@dataclass
class Ranking:
    """What a prefill-time policy decided for one request.

    order:   [L, KvH, K] int32 prompt positions, best first (padded past `ranked`); int32, as
             the row keeps it for the request's life (L * KvH * budget entries).
    ranked:  [L] how many entries of `order` are real in each layer.
    budgets: [L] tokens each layer attends to per decode step (window and generated included).
    """

    rid: str | None
    prompt_len: int
    order: torch.Tensor
    ranked: list[int]
    budgets: list[int]


def shared_order(first: torch.Tensor, scores: torch.Tensor | None, k: int, num_kv_heads: int) -> torch.Tensor:
    """Positions `first` (kept by every head, in order) then each head's top scores, k in all.

    first:  [f] int64 positions; scores: [KvH, P] over positions 0 .. P-1 (None: no more).
    returns [KvH, min(k, f + P)] int64.
    """
    head = first[None, :].expand(num_kv_heads, -1)
    take = min(k - first.numel(), 0 if scores is None else scores.shape[1])
    if take <= 0:
        return head[:, :k]
    # A stable sort, so ties go to the lower position whatever the platform.
    best = torch.argsort(scores, dim=1, descending=True, stable=True)[:, :take]
    return torch.cat([head, best], dim=1)


def prompt_scores(r: RequestView, layer: int, window: dict, key_buffers, size: int) -> torch.Tensor:
    """[KvH, N] attention of the last `size` prompt queries of `layer` to every prompt token."""
    q, scale = window[layer]
    q = q[-size:]
    n = r.seq_len
    return window_scores(q, key_buffers[layer][r.row_slots[:n]], n - q.shape[0], scale)


class PrefillSelectionPolicy(KVPolicy):
    """Base of the prefill-time policies: subclasses implement `rank` and declare the prompt
    queries it reads (`prompt_needs`)."""

    kind = "prefill-time"

    def __init__(self, kv, shape, num_slots, dtype, device, tokens=None):
        super().__init__(kv, shape, num_slots, dtype, device, tokens)
        self.needs = self.prompt_needs()
        self.queries = PromptQueries(self.needs.query_window)
        self._rankings: dict[int, Ranking] = {}
        self._reqs: list[RequestView] = []
        self._warned = False
        self._is_decode = False

    def prompt_needs(self) -> PolicyNeeds:
        """The prompt queries `rank` reads (by default none: it ranks by position alone)."""
        return PolicyNeeds()

    def observation_window(self, window: int) -> PolicyNeeds:
        """The last `window` prompt queries of every layer (SnapKV's observation window)."""
        return PolicyNeeds(query_layers=frozenset(range(self.shape.num_layers)), query_window=window)

    # --- prefill ------------------------------------------------------------------------------
    def begin_forward(self, reqs: list[RequestView], is_decode: bool) -> None:
        self._reqs = reqs
        self._is_decode = is_decode
        if is_decode:
            self.queries.end_prompt(r.row for r in reqs)
        else:
            self.queries.begin(len(reqs))

    def observe_queries(self, layer_id, req_index, q, scale) -> None:
        self.queries.add(req_index, layer_id, q, scale)

    def end_forward(self, reqs: list[RequestView], key_buffers: list[torch.Tensor]) -> None:
        self.record_tokens(reqs)
        if self._is_decode:
            return
        for i, r in enumerate(reqs):
            if not self.answers(r):
                continue  # another member of a PolicySet ranks it; nothing to carry here
            window = self.queries.take(i, r)
            if not r.ends_prompt():
                continue  # an earlier chunk: the one that computes the prompt's last token ranks
            prompt = r.prompt()
            orders, budgets = self.rank(prompt, window, key_buffers)
            self._rankings[r.row] = Ranking(
                r.rid, prompt.seq_len, stack_orders(orders), [o.shape[1] for o in orders], budgets
            )

    def record_tokens(self, reqs: list[RequestView]) -> None:
        """Hook for policies that classify tokens (per KV slot, so radix hits see them)."""

    @abc.abstractmethod
    def rank(
        self, r: RequestView, window: dict, key_buffers: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], list[int]]:
        """Rank the prompt positions 0 .. r.seq_len-1 of one request.

        window:  {layer: (queries [m, H, D] of the last m prompt positions, scale)} for query_layers.
        returns: per layer, [KvH, k_l] int64 positions best first (the same k_l for every head;
                 positions left out are never attended once the sequence outgrows the budget),
                 and the per-layer budgets [L] (summing to L * r.budget, or each r.budget).
        """

    # --- helpers for subclasses -----------------------------------------------------------------
    def snap_order(self, r, layer, window, key_buffers, obs: int, keep: int, kernel: int, pooling: str) -> torch.Tensor:
        """SnapKV's ranking in one layer: the `obs` last prompt tokens, then the rest by pooled
        observation-window attention. returns [KvH, min(keep, N)]."""
        n = r.seq_len
        obs = min(obs, n)
        recent = torch.arange(n - 1, n - obs - 1, -1, device=r.row_slots.device)
        scores = None
        if n > obs:
            scores = pool_scores(prompt_scores(r, layer, window, key_buffers, obs)[:, : n - obs], kernel, pooling)
        return shared_order(recent, scores, keep, self.shape.num_kv_heads)

    # --- decode -------------------------------------------------------------------------------
    def select(self, layer_id, req_index, q):
        r = self._reqs[req_index]
        n, device = r.seq_len, r.row_slots.device
        kvh = self.shape.num_kv_heads
        rk = self._ranking_of(r)
        kept = self._kept(rk, layer_id, n)
        if kept is None:
            return all_positions(n, kvh, device)
        generated, prompt = kept
        newest = torch.arange(n - 1, n - 1 - generated, -1, device=device)
        positions = torch.cat([rk.order[layer_id, :, :prompt].long(), newest[None, :].expand(kvh, -1)], dim=1)
        return positions, torch.ones_like(positions, dtype=torch.bool)

    def selection_counts(self, layer_id, req_indices):
        """What `select` keeps (the same for every KV head), from the ranking alone."""
        counts = []
        for i in req_indices:
            n = self._reqs[i].seq_len
            kept = self._kept(self._ranking_of(self._reqs[i]), layer_id, n)
            counts.append(n if kept is None else sum(kept))
        return counts

    @staticmethod
    def _kept(rk: Ranking, layer_id: int, n: int) -> tuple[int, int] | None:
        """None if the sequence of n tokens fits the layer's budget (all of it is attended), else
        (generated, prompt): the newest generated tokens (up to the budget) and the best-ranked
        prompt tokens that still fit."""
        budget = rk.budgets[layer_id]
        if n <= budget:
            return None
        generated = min(max(n - rk.prompt_len, 0), budget)
        return generated, min(budget - generated, rk.ranked[layer_id])

    def _ranking_of(self, r: RequestView) -> Ranking:
        """The request's ranking; if it has none (cannot happen: every prefill ends with one),
        a ranking of no prompt tokens, so the request attends to its recent tokens."""
        rk = self._rankings.get(r.row)
        if rk is not None and rk.rid == r.rid:
            return rk
        if not self._warned:
            logger.warning(
                "%s: no prompt ranking for request %s; attending to its recent tokens", self.kv.policy, r.rid
            )
            self._warned = True
        L, kvh = self.shape.num_layers, self.shape.num_kv_heads
        return Ranking(
            r.rid, 0, torch.zeros(L, kvh, 0, dtype=torch.int32, device=r.row_slots.device), [0] * L, [r.budget] * L
        )

    # --- eviction -----------------------------------------------------------------------------
    def resident_bound(self, budget: int, prompt_len: int) -> int:
        """A layer keeps at most `budget` prompt tokens (policies with per-layer budgets: their
        largest layer budget)."""
        return min(budget, prompt_len)

    def kept_positions(self, req_index, r, prefix=0):
        """The ranking itself: each layer and head reads a prefix of its order, best first."""
        rk = self._rankings[r.row]
        order = rk.order.long()
        counted = (
            torch.arange(order.shape[2], device=order.device) < torch.tensor(rk.ranked, device=order.device)[:, None]
        )
        return order.masked_fill(~counted[:, None, :], -1)

    def compacted(self, req_index, r, prefix, kept, moved):
        self._rankings[r.row].order = moved.to(torch.int32)

    # --- lifetime -----------------------------------------------------------------------------
    def release_rows(self, free_rows: set[int]) -> None:
        forget_rows(self._rankings, free_rows)
        self.queries.release(free_rows)

    def reset(self) -> None:
        self._rankings.clear()
        self.queries.reset()

    def stats(self) -> dict:
        return {"rankings": len(self._rankings), "carried_queries": len(self.queries)}


def stack_orders(orders: list[torch.Tensor]) -> torch.Tensor:
    """Per-layer orders [KvH, k_l] padded (with position 0, never read past keep) to [L, KvH, max k] int32."""
    width = max(o.shape[1] for o in orders)
    return torch.stack([torch.nn.functional.pad(o, (0, width - o.shape[1])) for o in orders]).to(torch.int32)


class SlotFlags:
    """A per-KV-slot bool (e.g. "this token is a separator"), written for every computed token so
    a radix-cache hit finds the flags of its cached prefix. token_mask: [vocab] bool or None
    (no tokenizer: every flag is False)."""

    def __init__(self, num_slots: int, token_mask: torch.Tensor | None, device):
        self.mask = None if token_mask is None else token_mask.to(device)
        self.flags = torch.zeros(num_slots, dtype=torch.bool, device=device)

    def record(self, reqs: list[RequestView]) -> None:
        if self.mask is None:
            return
        for r in reqs:
            ids = r.token_ids.to(self.mask.device).clamp(0, self.mask.numel() - 1)
            self.flags[r.row_slots[r.new_start :]] = self.mask[ids]

    def of(self, slots: torch.Tensor) -> torch.Tensor:
        return self.flags[slots]
