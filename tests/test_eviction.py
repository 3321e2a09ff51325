"""Eviction's arithmetic and its promise, without a server: where a request's private prompt goes,
and that after the compaction every decode step reads the same keys and values, in the same
order, as without it (the server tests check the same end to end, tokens and pool included)."""

import dataclasses

import pytest
import torch

from dynsplit_sglang import eviction
from dynsplit_sglang.config import KVConfig, KVConfigError
from dynsplit_sglang.policies import DynSplitOptions, QuestOptions, RequestView
from tests.test_policies import PREFILL_TIME, SHAPE, SLOTS, make_policy, prefill, window_pattern


def plan(bound=lambda budget, n: budget, evict=True, page_size=1, min_kept=0):
    return eviction.EvictionPlan(
        {"snapkv": bound, "quest": lambda b, n: None}, {"snapkv": evict}, "snapkv", 64, page_size, min_kept
    )


def test_start_leaves_the_bound_on_a_page_after_the_hit():
    p = plan()
    assert p.start(None, 64, 1000, None, prefix=0) == 936
    assert p.start(None, 64, 1000, None, prefix=500) == 936
    assert p.start(None, 64, 1000, None, prefix=936) is None  # the private part is what would be kept
    assert p.start(None, 1000, 1000, None, prefix=0) is None  # the budget covers the prompt
    assert plan(page_size=16).start(None, 64, 1000, None, prefix=0) == 928  # rounded down to a page


def test_start_stays_a_sliding_window_back():
    """A hybrid model's sliding layers read the prompt's last tokens: never given back."""
    assert plan(min_kept=512).start(None, 64, 1000, None, prefix=0) == 488
    assert plan(min_kept=16).start(None, 64, 1000, None, prefix=0) == 936  # the bound is wider
    assert plan(min_kept=1000).start(None, 64, 1000, None, prefix=0) is None


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
    moved_policy.compacted(0, r, prefix, kept, moved)

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


# --- decode-time policies: a resident set of whole blocks, the sequence closes up --------------------
def decode_step(policy, keys, view, budget, q, layer=0):
    """One decode step whose new token is the last of `view` ([m] slots of the request's sequence
    as the backend shows it); returns the slots each KV head reads."""
    r = RequestView(view, view.numel() - 1, torch.zeros(1, dtype=torch.int64), "r", row=0, budget=budget)
    policy.begin_forward([r], True)
    positions, valid = policy.select(layer, 0, q)
    policy.end_forward([r], [keys] * SHAPE.num_layers)
    return [set(view[p[v]].tolist()) for p, v in zip(positions, valid)]


def closed_blocks(policy, view):
    r = RequestView(view, view.numel(), torch.zeros(0, dtype=torch.int64), "r", row=0)
    recs = policy._blocks_of(r, view)
    return list(zip(policy.table.rec_start[recs].tolist(), policy.table.rec_end[recs].tolist()))


@pytest.mark.parametrize(
    "options",
    [
        DynSplitOptions(evict=True, resident=1.0, split="fixed_interval", block_size=12, delta=0),
        DynSplitOptions(evict=True, resident=1.5, candidates="all"),
        QuestOptions(evict=True, resident=2.0, page_size=8),
    ],
    ids=["dynsplit-fixed", "dynsplit", "quest"],
)
@pytest.mark.parametrize("prefix", [0, 37])
def test_decode_time_compaction_keeps_whole_blocks_and_the_sequence_closes_up(options, prefix):
    """The resident set is whole blocks plus the open tail, within resident_bound, the same
    whatever the radix hit; after the move every block record bounds the KV at its new
    positions, a step reads only resident or generated tokens, and decode closes the same
    blocks as without eviction."""
    budget, n = 64 if options.policy == "dynsplit" else 24, 200
    torch.manual_seed(2)
    keys, queries = window_pattern(n, [5, 90, 150])
    keys += 0.1 * torch.randn_like(keys)
    values = torch.randn_like(keys)
    on, missed = make_policy(options, budget), make_policy(options, budget)
    off = make_policy(dataclasses.replace(options, evict=False), budget)
    bound = on.resident_bound(budget, n)
    assert off.resident_bound(budget, n) is None and bound >= budget
    for p in (on, missed, off):
        r = prefill(p, keys, n, budget, queries, evict=p is not off)
    resident = missed.kept_positions(0, r, 0)[0, 0]  # the whole set (no hit)
    kept = on.kept_positions(0, r, prefix)
    assert (kept == kept[0, 0]).all(), "one resident set for every layer and head"
    private = kept[0, 0]
    assert private.tolist() == [q for q in resident.tolist() if q >= prefix], "a hit changes the set"
    assert resident.numel() <= bound and (resident.diff() > 0).all()
    held = set(resident.tolist())
    blocks = closed_blocks(off, torch.arange(n))
    assert all(len(held & set(range(s, e + 1))) in (0, e - s + 1) for s, e in blocks), "blocks are kept whole"
    open_start = blocks[-1][1] + 1
    assert set(range(open_start, n)) <= held and {90, 150} <= held

    to = n - private.numel()
    moved = eviction.compacted_positions(kept, prefix, to, n)
    new_keys, new_values = keys.clone(), values.clone()
    eviction.move_kv((new_keys, new_values), torch.arange(n), kept[0], moved[0])
    on.compacted(0, r, prefix, kept, moved)
    ev = eviction.Eviction("r", 0, prefix, to, gap_end=to)

    def original(q):  # a closed-up position's position before the move
        return q if q < prefix else int(private[q - prefix]) if q < prefix + private.numel() else q + ev.gap

    # every record the request keeps bounds the keys now at its (closed-up) positions
    view = ev.view(torch.arange(n))
    recs = on._blocks_of(RequestView(view, view.numel(), torch.zeros(0), "r", row=0), view)
    for rec, (s, e) in zip(recs, closed_blocks(on, view)):
        slots = view[s : e + 1]
        assert torch.equal(on.table.kmin[0, rec], new_keys[slots].amin(0))
        assert torch.equal(on.table.kmax[0, rec], new_keys[slots].amax(0))
    assert [(original(s), original(e)) for s, e in closed_blocks(on, view)] == [(s, e) for s, e in blocks if s in held]

    # decode: reads only resident or generated slots, and closes the blocks eviction off closes
    readable = (held & set(range(prefix))) | set(range(to, n + 40))
    for m in range(n + 1, n + 40):
        new_keys[m - 1] = keys[m - 1] = torch.randn(SHAPE.num_kv_heads, SHAPE.head_dim)
        q = torch.randn(SHAPE.num_heads, SHAPE.head_dim)
        view = ev.view(torch.arange(m))
        read = decode_step(on, new_keys, view, budget, q)
        assert all(h <= readable and len(h) <= budget for h in read)
        decode_step(off, keys, torch.arange(m), budget, q)
    late_on = [(original(s), original(e)) for s, e in closed_blocks(on, view) if original(s) >= n]
    late_off = [(s, e) for s, e in closed_blocks(off, torch.arange(n + 39)) if s >= n]
    assert late_on == late_off and late_on

    stats = on.stats()
    assert stats["records_in_use"] == stats["records_owned"]
    on.release_rows({0})
    stats = on.stats()
    assert stats["records_in_use"] == stats["records_owned"]


def test_decode_time_eviction_options_are_checked():
    with pytest.raises(KVConfigError, match="resident"):
        DynSplitOptions(evict=True, resident=0.5).validate()
    # eviction is on by default: the options it cannot serve say how to turn it off
    with pytest.raises(KVConfigError, match='layer_budgets.*add "evict": false'):
        DynSplitOptions(layer_budgets="dynamickv").validate()
    with pytest.raises(KVConfigError, match='dense_layers.*add "evict": false'):
        QuestOptions(dense_layers=2).validate()
    DynSplitOptions(layer_budgets="dynamickv", evict=False).validate()
    QuestOptions(dense_layers=2, evict=False).validate()
    with pytest.raises(KVConfigError, match="resident_rank"):
        DynSplitOptions(evict=True, resident_rank="max").validate()
    policy = make_policy(DynSplitOptions(evict=True), 64)
    assert policy.needs.query_window == 32 and len(policy.needs.query_layers) == SHAPE.num_layers
    assert make_policy(DynSplitOptions(evict=False), 64).needs.query_window == 0  # nothing collected with eviction off


@pytest.mark.parametrize(
    "options, attended",
    [
        (DynSplitOptions(evict=True, resident=1.0, candidates="all"), [5, 90, 150]),
        # Quest keeps no recent window: the last closed page is not resident, and the open page
        # starts after it, not after the last resident one
        (QuestOptions(evict=True, resident=1.0), [5, 40, 90]),
    ],
)
def test_a_request_with_nothing_to_free_reads_its_resident_set_in_place(options, attended):
    """A radix hit that leaves no private prompt to free (the backend then passes prefix = the
    prompt's end): nothing moves, and every step reads what a compacted twin reads."""
    budget, n = 64, 200
    torch.manual_seed(3)
    keys, queries = window_pattern(n, attended)
    keys += 0.1 * torch.randn_like(keys)
    in_place, moved = make_policy(options, budget), make_policy(options, budget)
    for p in (in_place, moved):
        r = prefill(p, keys, n, budget, queries, evict=True)
    nothing = in_place.kept_positions(0, r, n)
    assert nothing.shape[2] == 0
    in_place.compacted(0, r, n, nothing, nothing)
    kept = moved.kept_positions(0, r, 0)
    private = kept[0, 0]
    to = n - private.numel()
    moved_keys = keys.clone()
    eviction.move_kv((moved_keys,), torch.arange(n), kept[0], eviction.compacted_positions(kept, 0, to, n)[0])
    moved.compacted(0, r, 0, kept, eviction.compacted_positions(kept, 0, to, n))
    ev = eviction.Eviction("r", 0, 0, to, gap_end=to)
    for m in range(n + 1, n + 20):
        keys[m - 1] = moved_keys[m - 1] = torch.randn(SHAPE.num_kv_heads, SHAPE.head_dim)
        q = torch.randn(SHAPE.num_heads, SHAPE.head_dim)
        read_in_place = decode_step(in_place, keys, torch.arange(m), budget, q)
        read_moved = decode_step(moved, moved_keys, ev.view(torch.arange(m)), budget, q)
        original = {int(s): int(p) for s, p in zip(torch.arange(to, n), private)}  # moved slot -> position
        assert [{original.get(s, s) for s in h} for h in read_moved] == read_in_place
        assert all(h <= set(private.tolist()) | set(range(n, m)) for h in read_in_place)


def test_per_head_ranking_keeps_what_one_head_needs():
    """A block that one (layer, KV head) attends to sharply but the others ignore outranks one
    that every head likes a little under "per_head"; summed over heads ("sum") it does not."""
    from dynsplit_sglang.policies.dynsplit import block_order

    starts, ends = torch.tensor([0, 10, 20, 30]), torch.tensor([9, 19, 29, 39])
    mass = torch.full((8, 40), 0.01)
    mass[:, 10:20] = 0.05  # block 1: every head a little
    mass[3, 30:40] = 0.2  # block 3: one head, sharply
    mass[:, 0:10] = 0.04  # block 0: a little less than block 1 everywhere
    assert block_order(mass, starts, ends, "sum").tolist()[:2] == [1, 0]
    assert block_order(mass, starts, ends, "per_head").tolist()[:2] == [1, 3]


def test_a_follower_reads_the_hit_in_place_and_copies_only_the_moved_blocks():
    """A member of a PolicySet follows another member's compaction of a request it does not
    answer: the hit's blocks stay the records its slots own (no copies: 27 variants x 52 requests
    on one 4k prompt once copied ~20 GB of key bounds), and only the blocks of the private prompt
    that moved get row-owned copies, returned when the request leaves."""
    options = DynSplitOptions(evict=True, resident=1.0, split="fixed_interval", block_size=12, delta=0)
    budget, n, prefix = 64, 200, 150
    torch.manual_seed(3)
    keys, queries = window_pattern(n, [5, 90, 150])
    leader, follower = make_policy(options, budget), make_policy(options, budget)
    for p in (leader, follower):
        r = prefill(p, keys, n, budget, queries, evict=True)
    kept = leader.kept_positions(0, r, prefix)
    moved = eviction.compacted_positions(kept, prefix, n - kept.shape[-1], n)
    hit = set(follower.table.slot_record[:prefix].tolist()) - {-1}
    before = follower.table.records_in_use
    follower.follow_compaction(0, r, prefix, kept, moved)
    rows = follower._row_records[0]
    assert hit and hit <= set(rows.records.tolist())  # read in place
    assert not hit & set(rows.owned.tolist())
    assert follower.table.records_in_use <= before  # the copies replace the moved blocks' records
    # fixed blocks are decided at their last token: the copies are exactly the kept blocks that
    # end in the private prompt (one straddles the hit's end)
    private = set(kept[0, 0].tolist())
    kept_private = [e for e in range(11, n, 12) if e >= prefix and set(range(max(e - 11, prefix), e + 1)) <= private]
    assert rows.owned.numel() == len(kept_private)
    stats = follower.stats()
    assert stats["records_in_use"] == stats["records_owned"]
    follower.release_rows({0})
    stats = follower.stats()
    assert stats["records_in_use"] == stats["records_owned"]
