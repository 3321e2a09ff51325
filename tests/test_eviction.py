"""Eviction's arithmetic and its promise, without a server: where a request's private prompt goes,
and that after the compaction every decode step reads the same keys and values, in the same
order, as without it (the server tests check the same end to end, tokens and pool included)."""

import dataclasses

import pytest
import torch

from dynsplit_sglang import eviction
from dynsplit_sglang.config import KVConfig
from dynsplit_sglang.policies import RequestView
from tests.test_policies import PREFILL_TIME, SHAPE, SLOTS, make_policy, prefill, window_pattern


def plan(bound=lambda budget, n: budget, evict=True, page_size=1):
    return eviction.EvictionPlan(
        {"snapkv": bound, "quest": lambda b, n: None}, {"snapkv": evict}, "snapkv", 64, page_size
    )


def test_start_leaves_the_bound_on_a_page_after_the_hit():
    p = plan()
    assert p.start(None, 64, 1000, None, prefix=0) == 936
    assert p.start(None, 64, 1000, None, prefix=500) == 936
    assert p.start(None, 64, 1000, None, prefix=936) is None  # the private part is what would be kept
    assert p.start(None, 1000, 1000, None, prefix=0) is None  # the budget covers the prompt
    assert plan(page_size=16).start(None, 64, 1000, None, prefix=0) == 928  # rounded down to a page


def test_start_follows_the_option_the_request_and_the_policy():
    assert plan(evict=False).start(None, 64, 1000, None, prefix=0) is None
    assert plan(evict=False).start(None, 64, 1000, True, prefix=0) == 936  # custom_params.kv_evict
    assert plan().start(None, 64, 1000, False, prefix=0) is None
    assert plan().start("quest", 64, 1000, True, prefix=0) is None  # a policy that does not evict


def test_compacted_positions_move_private_tokens_in_order_and_keep_shared_ones():
    kept = torch.tensor([[[5, 90, 2, 95, -1], [99, 1, 98, -1, -1]]])  # [L=1, KvH=2, K=5]
    moved = eviction.compacted_positions(kept, prefix=10, start=97, end=100)
    assert moved.tolist() == [[[5, 97, 2, 98, -1], [97, 1, 98, -1, -1]]]
    assert eviction.compacted_positions(kept, prefix=0, start=97, end=100) is None  # 4 private > 3 slots


def read(policy, keys, values, n, budget, q, layer):
    """What one decode step at length n reads in a layer: [KvH, B, D] keys and values, in order."""
    r = RequestView(torch.arange(n), n - 1, torch.zeros(1, dtype=torch.int64), "r", row=0, budget=budget)
    policy.begin_forward([r], True)
    positions, valid = policy.select(layer, 0, q)
    heads = torch.arange(SHAPE.num_kv_heads)[:, None]
    assert valid.all()
    return positions, keys[positions, heads], values[positions, heads]


@pytest.mark.parametrize("name", PREFILL_TIME)
@pytest.mark.parametrize("prefix", [0, 40])
def test_compaction_reads_the_same_kv_in_the_same_order(name, prefix):
    budget, n = 48, 150
    options = KVConfig(policy=name).options
    bound = make_policy(options, budget).resident_bound(budget, n)
    start = eviction.EvictionPlan({name: lambda b, m: bound}, {name: True}, name, budget, 1).start(
        None, budget, n, None, prefix
    )
    assert start == n - bound
    keys_q, queries = window_pattern(n, [3, 40, 77])
    torch.manual_seed(0)
    keys = torch.randn(SLOTS, SHAPE.num_kv_heads, SHAPE.head_dim)
    keys[:n] = keys_q[:n]
    values = torch.randn(SLOTS, SHAPE.num_kv_heads, SHAPE.head_dim)

    kept_policy, moved_policy = make_policy(options, budget), make_policy(options, budget)
    for p in (kept_policy, moved_policy):
        r = prefill(p, keys, n, budget, queries, evict=True)
    kept = moved_policy.kept_positions(0, r)
    assert ((kept >= 0).sum(dim=2) <= bound).all(), "a layer keeps more than resident_bound"
    moved = eviction.compacted_positions(kept, prefix, start, n)
    moved_keys, moved_values = keys.clone(), values.clone()
    # the fake buffers stand for every layer: move layer 0's tokens, read layer 0
    eviction.move_kv((moved_keys, moved_values), torch.arange(n), kept[0], moved[0])
    moved_policy.compacted(0, r, moved)

    for m in (n + 1, n + 20, n + 60):
        q = torch.randn(SHAPE.num_heads, SHAPE.head_dim)
        before = read(kept_policy, keys, values, m, budget, q, layer=0)
        after = read(moved_policy, moved_keys, moved_values, m, budget, q, layer=0)
        assert torch.equal(before[1], after[1]) and torch.equal(before[2], after[2])
        read_positions = after[0]
        assert not ((read_positions >= prefix) & (read_positions < start)).any(), "read evicted KV"


def test_dynamickv_caps_a_layer_at_what_the_compacted_slots_hold():
    """Uncapped, the layer whose scores win the competition keeps far more than the budget; with
    eviction it keeps at most evict_cap x budget, and the other layers get the rest."""
    options = dataclasses.replace(KVConfig(policy="dynamickv").options, evict_cap=1.5)
    budget, n = 40, 200
    keys, queries = window_pattern(n, [3])
    torch.manual_seed(1)
    widths = {}
    for evict in (False, True):
        policy = make_policy(options, budget)
        r = prefill(policy, keys, n, budget, queries * torch.linspace(3, 0.1, n)[:, None, None], evict=evict)
        widths[evict] = (policy.kept_positions(0, r) >= 0).sum(dim=2)[:, 0].tolist()
    assert max(widths[False]) > 60 >= max(widths[True])
    assert sum(widths[True]) == sum(widths[False]) == SHAPE.num_layers * budget
