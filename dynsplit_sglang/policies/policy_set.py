"""Several policies in one server (`--kv-variants`); each request is answered by one of them.

Every member sees every forward of every request (prefill statistics, decode bookkeeping), so the
state a member keeps per KV slot exists for a prompt whichever member's request computed it, and
requests that share a prompt share its prefill through the radix cache whatever policy they pick.
State of one request (a prefill-time ranking, per-layer budgets) a member keeps only for the
requests it answers (`KVPolicy.answers`), and `select` is routed by the request's
`RequestView.policy`. The cost: each member's bookkeeping
runs for every request, so a server for production runs one policy; variants are for comparing
policies on the same traffic (benchmarks/accuracy does).

Decode-time statistics (DynSplit-KV's DD rows of generated tokens) are measured against what the
request's own policy attended, for every member alike.
"""

from __future__ import annotations

import torch

from dynsplit_sglang.block_table import ModelShape
from dynsplit_sglang.config import KVConfig
from dynsplit_sglang.policies.base import KVPolicy, PolicyNeeds, RequestView, stack_selections


def build_policy(kv: KVConfig, shape: ModelShape, num_slots: int, dtype, device, tokens=None) -> KVPolicy:
    """The --kv policy, or a PolicySet of it and the --kv-variants (each with the server's budget)."""
    from dynsplit_sglang.policies import POLICY_CLASSES

    members = {
        label: POLICY_CLASSES[o.policy](KVConfig(o.policy, kv.budget, o), shape, num_slots, dtype, device, tokens)
        for label, o in kv.policies.items()
    }
    if len(members) == 1:
        return members[kv.policy]
    for label, member in members.items():
        member.label = label  # it keeps per-request state only for the requests it answers
    return PolicySet(members, kv.policy)


class PolicySet(KVPolicy):
    name = "set"

    def __init__(self, members: dict[str, KVPolicy], default: str):
        """members: label -> policy (the --kv policy under its own name, then the variants)."""
        self.members = members
        self.default = default
        self._reqs: list[RequestView] = []
        self._subsets: dict[tuple[int, ...], list] = {}
        # What every member needs; when the score heads differ, the band holds all heads and
        # each member takes its own (their indices as a tensor, made once).
        self.needs = PolicyNeeds.union([p.needs for p in members.values()])
        self._own_heads = {
            label: torch.tensor(p.needs.score_heads, device=p.device)
            for label, p in members.items()
            if self.needs.score_heads is None and p.needs.score_heads is not None
        }

    def begin_forward(self, reqs: list[RequestView], is_decode: bool) -> None:
        self._reqs = reqs
        self._subsets = {}  # a decode step's Selecting -> [(member, its rows, their Selecting)]
        for p in self.members.values():
            p.begin_forward(reqs, is_decode)

    def observe(self, layer_id: int, req_index: int, band_logits: torch.Tensor, lse: torch.Tensor) -> None:
        """band_logits [h, n, W] over `needs.score_heads` and this set's band width; each member
        gets its own heads and its own width (the first columns: keys q, q-1, ...)."""
        for p, band, member_lse in self._members_band(layer_id, band_logits, lse):
            p.observe(layer_id, req_index, band, member_lse)

    def observe_step(self, layer_id: int, band_logits: torch.Tensor, lse: torch.Tensor) -> None:
        for p, band, member_lse in self._members_band(layer_id, band_logits, lse):
            p.observe_step(layer_id, band, member_lse)

    def _members_band(self, layer_id: int, band_logits: torch.Tensor, lse: torch.Tensor):
        """(member, its band, its lse) for each member that scores this layer: its own width
        (the first columns: keys q, q-1, ...) and its own heads."""
        for label, p in self.members.items():
            if layer_id not in p.needs.score_layers:
                continue
            band, member_lse = band_logits[..., : p.needs.band_width], lse
            heads = self._own_heads.get(label)
            if heads is not None:
                band, member_lse = band[heads], lse[heads]
            yield p, band, member_lse

    def observe_queries(self, layer_id: int, req_index: int, q: torch.Tensor, scale: float) -> None:
        """q [m, H, D], m <= this set's query window; each member gets its own last rows."""
        for p in self.members.values():
            if layer_id in p.needs.query_layers:
                p.observe_queries(layer_id, req_index, q[max(0, q.shape[0] - p.needs.query_window) :], scale)

    def end_forward(self, reqs: list[RequestView], key_buffers: list[torch.Tensor]) -> None:
        for p in self.members.values():
            p.end_forward(reqs, key_buffers)

    # --- decode: the request's own policy selects ----------------------------------------------
    def sparse_in_layer(self, layer_id: int, req_indices: list[int]) -> list[int]:
        """The requests whose own policy selects in this layer."""
        return [i for i in req_indices if layer_id >= self.members[self._reqs[i].policy or self.default].dense_layers]

    # --- eviction: the request's own policy keeps its prompt -------------------------------------
    def kept_positions(self, req_index, r, prefix=0):
        return self.members[r.policy or self.default].kept_positions(req_index, r, prefix)

    def compacted(self, req_index, r, prefix, kept, moved):
        """The request's own policy took it. When its positions close up (a decode-time policy:
        one token set for all layers and heads), the others' per-slot state follows the moved
        tokens, since they see the request's closed-up sequence from then on; a prefill-time
        policy keeps the positions, and what the others keep for the overwritten slots is only
        ever read for this request, which they do not answer."""
        own = self.members[r.policy or self.default]
        own.compacted(req_index, r, prefix, kept, moved)
        if own.closes_gap(r):
            for p in self.members.values():
                if p is not own:
                    p.follow_compaction(req_index, r, prefix, kept, moved)

    def closes_gap(self, r):
        return self.members[r.policy or self.default].closes_gap(r)

    def select(self, layer_id: int, req_index: int, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        label = self._reqs[req_index].policy or self.default
        return self.members[label].select(layer_id, req_index, q)

    def select_batch(self, layer_id: int, req_indices: list[int], q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each member selects for its own requests in one call; rows in the order asked."""
        return self._by_member(
            req_indices, lambda member, ks, at: member.select_batch(layer_id, [req_indices[k] for k in ks], q[at])
        )

    def select_slots_batch(self, layer_id, sel, q):
        groups = self._subsets.get(sel.indices)
        if groups is None:  # the same for every layer that selects for these requests
            groups = self._subsets[sel.indices] = [
                (label, ks, sel.subset(ks)) for label, ks in self._rows_by_member(list(sel.indices)).items()
            ]
        picks = [
            (ks, *self.members[label].select_slots_batch(layer_id, mine, q[mine_at(ks)])) for label, ks, mine in groups
        ]
        if len(picks) == 1:
            return picks[0][1], picks[0][2]
        return stack_selections(len(sel), [(mine_at(ks), s, v) for ks, s, v in picks])

    def _rows_by_member(self, req_indices: list[int]) -> dict[str, list[int]]:
        """label -> the rows k (positions in req_indices) of the requests that member answers."""
        groups: dict[str, list[int]] = {}
        for k, i in enumerate(req_indices):
            groups.setdefault(self._reqs[i].policy or self.default, []).append(k)
        return groups

    def _by_member(self, req_indices: list[int], select) -> tuple[torch.Tensor, torch.Tensor]:
        """select(member, ks, at) for the rows ks of each member's requests (`at` indexes those
        rows of a batch tensor), stacked in the order asked (padding: position 0, not valid)."""
        groups = self._rows_by_member(req_indices)
        picks = []
        for label, ks in groups.items():
            at = mine_at(ks)
            picks.append((at, *select(self.members[label], ks, at)))
        if len(picks) == 1:
            return picks[0][1], picks[0][2]
        return stack_selections(len(req_indices), picks)

    def selection_counts(self, layer_id, req_indices):
        counts: list[int | None] = [None] * len(req_indices)
        for label, ks in self._rows_by_member(req_indices).items():
            mine = self.members[label].selection_counts(layer_id, [req_indices[k] for k in ks])
            if mine is None:
                return None
            for k, c in zip(ks, mine):
                counts[k] = c
        return counts

    def use_gpu_selection(self, on: bool) -> None:
        for p in self.members.values():
            p.use_gpu_selection(on)

    # --- slot lifetime ------------------------------------------------------------------------
    def release_slots(self, slots: torch.Tensor) -> None:
        for p in self.members.values():
            p.release_slots(slots)

    def release_rows(self, free_rows: set[int]) -> None:
        for p in self.members.values():
            p.release_rows(free_rows)

    def reset(self) -> None:
        for p in self.members.values():
            p.reset()

    def stats(self) -> dict:
        return {f"{label}.{k}": v for label, p in self.members.items() for k, v in p.stats().items()}

    def trace(self, event: dict) -> None:
        for p in self.members.values():
            p.trace(event)


def mine_at(ks: list[int]):
    """Index of rows ks of a batch tensor: a member's requests usually sit together in the batch,
    and a slice is a view where a list index would copy the rows."""
    return slice(ks[0], ks[-1] + 1) if ks[-1] - ks[0] + 1 == len(ks) else ks
