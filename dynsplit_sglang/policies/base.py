"""The interface every KV policy implements, shared by the server backend, scripts and tests.

A policy never touches attention itself. The backend runs dense prefill, shows the policy the
attention statistics of the layers it asks for (band logits for DD-Select, the queries of the last
prompt tokens for observation-window scores), lets it commit per-request state after the last
layer, and at decode asks it which positions each KV head attends to (then runs the attention).

Two kinds of policy share this interface: decode-time ones (DynSplit-KV, Quest) re-select blocks
against every decode query; prefill-time ones (policies/prefill_selection.py) rank the prompt
once, when its last token is computed, and keep that ranking for the rest of the request.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from dynsplit_sglang.block_table import ModelShape
from dynsplit_sglang.config import KVConfig, PolicyOptions
from dynsplit_sglang.decode_step import Selecting


@dataclass(frozen=True)
class PolicyNeeds:
    """Which attention statistics a policy reads, fixed when it is built; the backend computes
    only these.

    score_layers: layers whose band logits and row lse `observe` wants (DD-Select).
    band_width:   how many keys before each query (the query's own key first) the band holds.
    score_heads:  query heads `observe` wants; None for all.
    query_layers: layers whose last prompt queries `observe_queries` wants (observation windows).
    query_window: how many of the prompt's last queries those are. A radix-cache hit recomputes
                  at least this many tokens (patches/prefix_reserve.py), so a hit sees the same
                  queries as a miss.
    """

    score_layers: frozenset[int] = frozenset()
    band_width: int = 0
    score_heads: tuple[int, ...] | None = None
    query_layers: frozenset[int] = frozenset()
    query_window: int = 0

    @staticmethod
    def union(needs: list[PolicyNeeds]) -> PolicyNeeds:
        """What several policies need together: every layer any wants, the widest band and window;
        the score heads they share, or all heads when the scoring ones disagree (each then takes
        its own)."""
        heads = {n.score_heads for n in needs if n.score_layers}
        return PolicyNeeds(
            score_layers=frozenset().union(*(n.score_layers for n in needs)),
            band_width=max((n.band_width for n in needs), default=0),
            score_heads=next(iter(heads)) if len(heads) == 1 else None,
            query_layers=frozenset().union(*(n.query_layers for n in needs)),
            query_window=max((n.query_window for n in needs), default=0),
        )


@dataclass
class RequestView:
    """One request of a batch, as the policy sees it.

    row_slots: [seq_len] int64 KV slots of positions 0 .. seq_len-1 (its `req_to_token` row).
    new_start: first position computed in this forward (cached prefix length at prefill,
               seq_len - 1 at decode).
    token_ids: [seq_len - new_start] int64 ids of the tokens computed in this forward.
    rid:       SGLang request id (for traces).
    row:       the request's `req_to_token` row (stable for the request's life, reused after it).
    budget:    KV tokens this request attends to per decode step and layer (the server's
               --kv-budget or the request's custom_params.kv_budget).
    policy:    label of the policy that answers it when the server runs several
               (custom_params.kv_policy; "" for the --kv policy).
    prompt_len: tokens of its prompt (SGLang's origin_input_ids); None: unknown, the prompt
               ends where this forward ends. More than seq_len in a chunked prefill's earlier
               chunks; less after SGLang retracted the request, whose prefill then computes the
               tokens it had generated too.
    evict:     eviction is on for it (dynsplit_sglang/eviction.py): what its policy keeps of the
               prompt must fit the policy's resident_bound (whether or not a radix hit leaves
               anything to free, so a hit never changes what it attends to).
    """

    row_slots: torch.Tensor
    new_start: int
    token_ids: torch.Tensor
    rid: str | None = None
    row: int = -1
    budget: int = 0
    policy: str = ""
    prompt_len: int | None = None
    evict: bool = False

    @property
    def seq_len(self) -> int:
        return self.row_slots.numel()

    @property
    def prompt_end(self) -> int:
        """Position after the prompt's last token."""
        return self.seq_len if self.prompt_len is None else self.prompt_len

    def ends_prompt(self) -> bool:
        """Whether this forward computes the prompt's last token (prefill-time policies rank then)."""
        return self.new_start < self.prompt_end <= self.seq_len

    def prompt_queries(self, window: int) -> slice:
        """Which of this forward's new tokens are among the prompt's last `window` tokens (a slice
        of the new tokens; empty when the forward computes none of them)."""
        end = min(self.seq_len, self.prompt_end)
        start = max(self.new_start, end - window)
        return slice(start - self.new_start, max(start, end) - self.new_start)

    def prompt(self) -> RequestView:
        """This view cut at the prompt's end, for ranking the prompt (called when ends_prompt())."""
        end = self.prompt_end
        if end >= self.seq_len:
            return self
        new_start = min(self.new_start, end)
        return replace(
            self,
            row_slots=self.row_slots[:end],
            new_start=new_start,
            token_ids=self.token_ids[: end - new_start],
            prompt_len=end,
        )


class KVPolicy(abc.ABC):
    """Base class of the KV policies behind `--kv`.

    A policy declares its options dataclass (`Options`, whose `policy` is the `--kv` name), its
    `kind` ("decode-time" or "prefill-time") and a one-line `summary` of what a decode step
    attends to; the registry (`dynsplit_sglang.policies`) and the README tables read them. At
    construction it sets `needs`, the attention statistics it reads.
    """

    Options: ClassVar[type[PolicyOptions]]
    name: ClassVar[str]
    kind: ClassVar[str]
    summary: ClassVar[str]
    label: str = ""  # its label in a server running several policies (policy_set.py); "" alone
    needs: PolicyNeeds = PolicyNeeds()
    # The first `dense_layers` layers attend to every position (Quest's paper keeps 2 dense): the
    # backend sends them down its dense path, so the selection methods never see them.
    dense_layers: int = 0

    def answers(self, r: RequestView) -> bool:
        """Whether this policy selects for request r. State keyed by KV slot (blocks, token
        classes) is kept for every request, since the radix cache shares slots between requests;
        state of one request (a prefill-time ranking, per-layer budgets) only for those it answers."""
        return not self.label or r.policy == self.label

    def __init__(self, kv: KVConfig, shape: ModelShape, num_slots: int, dtype: torch.dtype, device, tokens=None):
        """tokens: a `delimiters.TokenTexts` (decoded vocabulary) for policies that classify tokens."""
        self.kv = kv
        self.options = kv.options
        self.shape = shape
        self.device = device

    # --- prefill and decode: attention statistics ---------------------------------------------
    def begin_forward(self, reqs: list[RequestView], is_decode: bool) -> None:
        """A forward pass over these requests starts."""

    def observe(self, layer_id: int, req_index: int, band_logits: torch.Tensor, lse: torch.Tensor) -> None:
        """Attention statistics of one request's new queries in one of `needs.score_layers`.

        band_logits: [h, n, W] fp32 logits of key q-b for b = 0 .. W-1 (-inf before position 0).
        lse:         [h, n] fp32 log-sum-exp of each query's logits over the keys it attended.
        """

    def observe_step(self, layer_id: int, band_logits: torch.Tensor, lse: torch.Tensor) -> None:
        """`observe` for every request of a decode step at once (one new query each).

        band_logits: [h, R, W]; lse: [h, R]. By default, `observe` request by request.
        """
        for i in range(band_logits.shape[1]):
            self.observe(layer_id, i, band_logits[:, i : i + 1], lse[:, i : i + 1])

    def observe_queries(self, layer_id: int, req_index: int, q: torch.Tensor, scale: float) -> None:
        """Queries [m, H, D] of the last m <= needs.query_window positions computed in this prefill
        forward for one request, in one of `query_layers` (after RoPE, as attention sees them);
        scale: the layer's softmax scale."""

    @abc.abstractmethod
    def end_forward(self, reqs: list[RequestView], key_buffers: list[torch.Tensor]) -> None:
        """All layers ran: commit per-request state (key_buffers: per layer [slots, KvH, D])."""

    # --- decode: selection --------------------------------------------------------------------
    def sparse_in_layer(self, layer_id: int, req_indices: list[int]) -> list[int]:
        """Which of these requests (longer than their budget) select in this layer; the others
        attend to every position (the dense layers)."""
        return [] if layer_id < self.dense_layers else req_indices

    @abc.abstractmethod
    def select(self, layer_id: int, req_index: int, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions the decode query q [H, D] of request `req_index` attends to in this layer.

        The reference path: one request, positions, plain torch. The backend calls
        `select_slots_batch`; tests and the offline tools check it against this.
        Only called when the sequence is longer than the request's budget, in a layer that
        `sparse_in_layer` lets select.
        returns positions [KvH, B] int64 and valid [KvH, B] bool; B is at most the request's budget
        for this layer (the budget itself, or the layer's share for per-layer budgets).
        """

    def select_batch(self, layer_id: int, req_indices: list[int], q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`select` for several requests at once: q [R, H, D] holds the decode queries of
        `req_indices`. returns positions [R, KvH, W] int64 and valid [R, KvH, W] bool, row k the
        selection of req_indices[k] padded to the widest. The default asks `select` per request;
        a batched override is the reference `select_slots_batch` maps to slots."""
        picks = [self.select(layer_id, i, q[k]) for k, i in enumerate(req_indices)]
        return stack_selections(len(picks), [(slice(k, k + 1), p[None], v[None]) for k, (p, v) in enumerate(picks)])

    def select_slots_batch(self, layer_id: int, sel: Selecting, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`select_batch` as KV slots, for the requests `sel` of a decode step (q [S, H, D] their
        queries). returns slots [S, KvH, W] int64 and valid [S, KvH, W] bool, each row's valid
        entries first. The default maps `select_batch`'s positions through `sel.slots`."""
        positions, valid = self.select_batch(layer_id, list(sel.indices), q)
        return sel.slots_at(positions), valid

    def selection_counts(self, layer_id: int, req_indices: list[int]) -> list[int] | None:
        """How many slots `select_slots_batch` will give each of these requests in this layer (the
        same for every KV head), known on the host before it runs; None if the policy cannot
        say. Lets the FlashInfer decode plan without reading the counts back from the device."""
        return None

    def use_gpu_selection(self, on: bool) -> None:
        """Select with the policy's GPU kernel, if it has one ($DYNSPLIT_SELECTION=triton)."""

    # --- eviction (dynsplit_sglang/eviction.py) -------------------------------------------------
    def resident_bound(self, budget: int, prompt_len: int) -> int | None:
        """The most prompt tokens any layer and KV head of a request with this budget and prompt
        keeps once its prompt is ranked (its KV slots after compaction); None: this policy does
        not evict. Known before the request runs, so the radix cache can be kept off those slots."""
        return None

    def kept_positions(self, req_index: int, r: RequestView, prefix: int = 0) -> torch.Tensor:
        """After `end_forward` ranked request r's prompt: the prompt positions [L, KvH, K] int64
        its decode steps may still read in each layer and KV head, in the order they read them,
        -1 past a layer's own count (at most resident_bound of them at or after `prefix`, the
        radix hit, which stays in place). Only for policies that evict."""
        raise NotImplementedError(f"{self.name} does not evict")

    def compacted(self, req_index: int, r: RequestView, prefix: int, kept: torch.Tensor, moved: torch.Tensor) -> None:
        """The backend moved request r's kept tokens: `moved` [L, KvH, K] int64 is `kept` (what
        `kept_positions` returned) with each moved token's new position (-1 entries stay -1)."""
        raise NotImplementedError(f"{self.name} does not evict")

    def follow_compaction(
        self, req_index: int, r: RequestView, prefix: int, kept: torch.Tensor, moved: torch.Tensor
    ) -> None:
        """Another policy of a PolicySet compacted request r (as `compacted`): update what this
        one keeps per KV slot for the tokens that moved (by default nothing)."""

    def closes_gap(self, r: RequestView) -> bool:
        """Whether, once request r is compacted, its sequence as the backend shows it to the policy
        leaves out the freed positions (the decode-time policies, whose kept tokens then sit right
        before the prompt's end), rather than keeping every position (the prefill-time ones,
        which read the moved positions)."""
        return False

    # --- slot lifetime ------------------------------------------------------------------------
    def release_slots(self, slots: torch.Tensor) -> None:
        """The KV allocator freed these slots."""

    def release_rows(self, free_rows: set[int]) -> None:
        """These `req_to_token` rows have no request (it finished or was retracted): drop what
        was kept for the request that had one (called before a prefill may give them out)."""

    def reset(self) -> None:
        """The KV pool was cleared (cache flush)."""

    def stats(self) -> dict:
        """Counters for leak checks and traces."""
        return {}

    def trace(self, event: dict) -> None:
        """Record a debugging event (a no-op unless the policy was configured to trace)."""


def all_positions(seq_len: int, num_kv_heads: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """A selection of every position: positions [KvH, seq_len] int64 and valid, all True (a
    layer whose budget covers the sequence)."""
    positions = torch.arange(seq_len, device=device)[None, :].expand(num_kv_heads, -1)
    return positions, torch.ones_like(positions, dtype=torch.bool)


def forget_rows(table: dict, rows: set[int]) -> None:
    """Remove the entries of these `req_to_token` rows from a per-row table (release_rows)."""
    for row in [row for row in table if row in rows]:
        del table[row]


def stack_selections(num_rows: int, parts) -> tuple[torch.Tensor, torch.Tensor]:
    """Selections of groups of rows stacked to positions [num_rows, KvH, W] int64 and valid
    [num_rows, KvH, W] bool, W the widest (padding: position 0, not valid).

    parts: (rows, positions [n, KvH, B], valid [n, KvH, B]) per group, rows indexing its n rows
           (a slice, or a list of row numbers).
    """
    first = parts[0][1]
    shape = (num_rows, first.shape[1], max(p.shape[2] for _, p, _ in parts))
    positions = torch.zeros(shape, dtype=torch.int64, device=first.device)
    valid = torch.zeros(shape, dtype=torch.bool, device=first.device)
    for rows, p, v in parts:
        positions[rows, :, : p.shape[2]] = p
        valid[rows, :, : v.shape[2]] = v
    return positions, valid
