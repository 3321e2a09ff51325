"""Several policies in one server (--kv-variants, custom_params.kv_policy).

A request answered by a member of a PolicySet gets exactly the selection that member gives when
it runs alone; members get their own heads, band width and query window; the flags and the
per-request choice are checked with messages that name the problem.
"""

import pytest
import torch

from dynsplit_sglang import request_options
from dynsplit_sglang.config import KVConfig, KVConfigError, parse_variants
from dynsplit_sglang.patches.kv_cli import kv_config_from
from dynsplit_sglang.policies import (
    DynSplitOptions,
    KVPolicy,
    PolicyNeeds,
    RequestView,
    SnapKVOptions,
    StreamingLLMOptions,
)
from dynsplit_sglang.policies.policy_set import PolicySet, build_policy
from tests.test_policies import SHAPE, FakeTokens, window_pattern

N, BUDGET = 200, 80
VARIANTS = {"snap": SnapKVOptions(window=8, kernel_size=1), "fixed": DynSplitOptions(split="fixed_interval")}


def run(policy, keys, queries, labels, steps=3, counted=None):
    """Prefill one prompt per label (own slot range each), then decode them in one batch;
    returns per request and step the kept positions per KV head (and appends the host-side
    selection counts of each step to `counted`, where the policy gives them)."""
    counted = [] if counted is None else counted
    rows = [torch.arange(i * N, (i + 1) * N) for i in range(len(labels))]
    reqs = [
        RequestView(r, 0, torch.zeros(N, dtype=torch.int64), f"r{i}", i, BUDGET, label)
        for i, (r, label) in enumerate(zip(rows, labels))
    ]
    policy.begin_forward(reqs, False)
    for layer in sorted(policy.needs.query_layers):
        for i in range(len(reqs)):
            policy.observe_queries(layer, i, queries[N - min(policy.needs.query_window, N) :], 1.0)
    policy.end_forward(reqs, [keys] * SHAPE.num_layers)
    kept = [[] for _ in labels]
    top = max(3, len(labels)) * N  # decode slots, past every prompt's range
    for step in range(steps):
        n = N + 1 + step
        reqs = [
            RequestView(
                torch.cat([r, torch.arange(top + 8 * i, top + 8 * i + step + 1)]),
                n - 1,
                torch.zeros(1, dtype=torch.int64),
                f"r{i}",
                i,
                BUDGET,
                label,
            )
            for i, (r, label) in enumerate(zip(rows, labels))
        ]
        policy.begin_forward(reqs, True)
        q = torch.randn(4, 8, generator=torch.Generator().manual_seed(step))
        picks = [policy.select(1, i, q) for i in range(len(reqs))]
        for i, (positions, valid) in enumerate(picks):
            kept[i].append([set(p[v].tolist()) for p, v in zip(positions, valid)])
        # The batched selection the backend uses gives every request exactly its own selection.
        order = list(range(len(reqs)))[::-1]
        positions, valid = policy.select_batch(1, order, q.expand(len(reqs), -1, -1))
        for k, i in enumerate(order):
            width = picks[i][0].shape[1]
            assert torch.equal(positions[k, :, :width][picks[i][1]], picks[i][0][picks[i][1]])
            assert torch.equal(valid[k, :, :width], picks[i][1]) and not valid[k, :, width:].any()
        # What the FlashInfer decode plans with, from the host, is what the selection made.
        counts = policy.selection_counts(1, order)
        if counts is not None:
            assert valid.sum(-1).tolist() == [[c] * SHAPE.num_kv_heads for c in counts]
            counted.append(counts)
        policy.end_forward(reqs, [keys] * SHAPE.num_layers)
    return kept


def test_each_request_gets_its_own_policys_selection():
    keys, queries = window_pattern(N, [10, 50, 51, 120])
    keys = keys.repeat(4, 1, 1)  # room for three prompts' slot ranges and the decode slots
    kv = KVConfig("streamingllm", BUDGET, StreamingLLMOptions(), variants=dict(VARIANTS))
    kv.validate()
    slots = keys.shape[0]
    together = build_policy(kv, SHAPE, slots, torch.float32, "cpu", FakeTokens())
    assert isinstance(together, PolicySet)
    labels = ["snap", "streamingllm", "fixed"]
    mixed = run(together, keys, queries, labels)
    for i, label in enumerate(labels):
        alone = build_policy(
            KVConfig(kv.policies[label].policy, BUDGET, kv.policies[label]),
            SHAPE,
            slots,
            torch.float32,
            "cpu",
            FakeTokens(),
        )
        assert not isinstance(alone, PolicySet)
        # alone, the request sits in the same slot range and row as in the mixed batch
        solo = run(alone, keys, queries, [""] * len(labels))[i]
        assert mixed[i] == solo, label
    assert mixed[0] != mixed[1] != mixed[2]
    stats = together.stats()
    assert all(k.startswith(("streamingllm.", "snap.", "fixed.")) for k in stats)
    # a prefill-time policy ranks only the requests it answers
    assert stats["snap.rankings"] == 1 and stats["streamingllm.rankings"] == 1


def test_a_members_rows_need_not_be_adjacent_in_the_batch():
    """The batched selection is each request's own when one member's requests sit apart in the
    batch and another's sit together (`run` checks every row against its request alone)."""
    keys, queries = window_pattern(N, [10, 50, 51, 120])
    keys = keys.repeat(6, 1, 1)
    kv = KVConfig("streamingllm", BUDGET, StreamingLLMOptions(), variants=dict(VARIANTS))
    kv.validate()
    # run() selects in reversed order: streamingllm, snap, fixed, fixed, snap
    labels = ["snap", "fixed", "fixed", "snap", "streamingllm"]
    kept = run(build_policy(kv, SHAPE, keys.shape[0], torch.float32, "cpu", FakeTokens()), keys, queries, labels)
    assert len(kept) == len(labels) and all(len(k) == 3 for k in kept)


def test_prompt_queries_are_kept_by_the_answering_member_until_decode():
    """The last prompt queries a prefill-time member ranks with are carried to a prompt's next
    chunk only by the member that answers the request, and dropped once the request decodes."""
    keys, queries = window_pattern(N, [10, 50, 51, 120])
    kv = KVConfig("streamingllm", BUDGET, StreamingLLMOptions(), variants=dict(VARIANTS))
    kv.validate()
    policy = build_policy(kv, SHAPE, keys.shape[0], torch.float32, "cpu", FakeTokens())
    reqs = [
        RequestView(torch.arange(N), 0, torch.zeros(N, dtype=torch.int64), "r0", 0, BUDGET, "snap"),
        RequestView(torch.arange(N), 0, torch.zeros(N, dtype=torch.int64), "r1", 1, BUDGET, "streamingllm"),
    ]
    policy.begin_forward(reqs, False)
    for layer in sorted(policy.needs.query_layers):
        for i in range(len(reqs)):
            policy.observe_queries(layer, i, queries[N - policy.needs.query_window :], 1.0)
    policy.end_forward(reqs, [keys] * SHAPE.num_layers)
    # StreamingLLM ranks without queries: it carries none
    assert policy.stats()["snap.carried_queries"] == 1 and policy.stats()["streamingllm.carried_queries"] == 0
    decoding = [
        RequestView(torch.arange(N + 1), N, torch.zeros(1, dtype=torch.int64), r.rid, r.row, BUDGET, r.policy)
        for r in reqs
    ]
    policy.begin_forward(decoding, True)
    assert policy.stats()["snap.carried_queries"] == 0 and policy.stats()["streamingllm.carried_queries"] == 0


def test_decode_time_members_give_their_counts_on_the_host():
    """A set knows each request's selection size before selecting: min(budget, seq_len) for
    DynSplit-type members, the generated plus the ranked prompt tokens that fit for prefill-time
    ones (`run` checks every count against the selection)."""
    keys, queries = window_pattern(N, [10, 50, 51, 120])
    keys = keys.repeat(4, 1, 1)
    kv = KVConfig("dynsplit", BUDGET, DynSplitOptions(), variants={"fixed": DynSplitOptions(split="fixed_interval")})
    kv.validate()
    counted = []
    run(
        build_policy(kv, SHAPE, keys.shape[0], torch.float32, "cpu", FakeTokens()),
        keys,
        queries,
        ["", "fixed"],
        counted=counted,
    )
    assert counted == [[BUDGET, BUDGET]] * 3
    mixed = KVConfig("streamingllm", BUDGET, StreamingLLMOptions(), variants=dict(VARIANTS))
    mixed.validate()
    counted = []
    run(
        build_policy(mixed, SHAPE, keys.shape[0], torch.float32, "cpu", FakeTokens()),
        keys,
        queries,
        ["snap", "streamingllm", "fixed"],
        counted=counted,
    )
    assert len(counted) == 3 and all(c <= BUDGET for step in counted for c in step)


class Recorder(KVPolicy):
    """Records what a member is shown."""

    name = "recorder"

    def __init__(self, layers, width, heads, window):
        self.device, self.seen = "cpu", []
        self.needs = PolicyNeeds(
            score_layers=frozenset(layers),
            band_width=width,
            score_heads=None if heads is None else tuple(heads),
            query_layers=frozenset(layers),
            query_window=window,
        )

    def observe(self, layer_id, req_index, band_logits, lse):
        self.seen.append(("band", layer_id, band_logits.clone(), lse.clone()))

    def observe_queries(self, layer_id, req_index, q, scale):
        self.seen.append(("queries", layer_id, q.clone()))

    def end_forward(self, reqs, key_buffers):
        pass

    def select(self, layer_id, req_index, q):
        raise AssertionError("not called here")


def test_members_get_their_own_heads_width_and_window():
    a, b = Recorder([1], 4, [0, 2], 8), Recorder([1, 2], 6, None, 3)
    ps = PolicySet({"a": a, "b": b}, "a")
    assert ps.needs.score_layers == {1, 2} and ps.needs.band_width == 6 and ps.needs.query_window == 8
    assert ps.needs.score_heads is None  # the members disagree: all heads, each takes its own
    band, lse, q = torch.randn(4, 5, 6), torch.randn(4, 5), torch.randn(8, 4, 2)
    ps.observe(1, 0, band, lse)
    ps.observe(2, 0, band[:, :, :6], lse)
    ps.observe_queries(1, 0, q, 1.0)
    _, _, band_a, lse_a = a.seen[0]
    assert torch.equal(band_a, band[[0, 2], :, :4]) and torch.equal(lse_a, lse[[0, 2]])
    assert [s[1] for s in b.seen if s[0] == "band"] == [1, 2] and torch.equal(b.seen[0][2], band)
    assert torch.equal(a.seen[-1][2], q) and torch.equal(b.seen[-1][2], q[-3:])
    same = PolicySet({"a": Recorder([1], 4, [1], 8), "b": Recorder([1], 4, [1], 8)}, "a")
    assert same.needs.score_heads == (1,)


def test_variants_flag_and_request_choice_are_checked():
    kv = kv_config_from(
        "dynsplit", 256, None, '{"snapkv": {"window": 16}, "fixed": {"policy": "dynsplit", "split": "fixed_interval"}}'
    )
    assert list(kv.policies) == ["dynsplit", "snapkv", "fixed"] and kv.variants["snapkv"].window == 16
    assert KVConfig.from_dict(kv.to_dict()) == kv
    for text, message in [
        ('{"full": {}}', "may not be empty, 'full' or the --kv policy's own name"),
        ('{"dynsplit": {}}', "may not be empty, 'full' or the --kv policy's own name"),
        ('{"x": {}}', "--kv-variants 'x': unknown policy 'x'"),
        ('{"q": {"policy": "quest", "pages": 3}}', "--kv-variants 'q': unknown key(s) pages for --kv quest"),
        ('{"q": 3}', "must map to a JSON object"),
        ("[1]", "--kv-variants must be a JSON object"),
    ]:
        with pytest.raises(KVConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            parse_variants(text, "dynsplit")
    with pytest.raises(KVConfigError, match=r"--kv-budget \(variant 'w'\) 20 is too small for windowkv"):
        kv_config_from("streamingllm", 20, None, {"w": {"policy": "windowkv"}}).validate()
    with pytest.raises(KVConfigError, match="--kv-variants applies to a compressing policy"):
        kv_config_from("full", None, None, {"snapkv": {}})

    request_options.configure(kv, 8192)
    try:
        request_options.check({"kv_policy": "fixed", "kv_budget": 100})
        request_options.check({"kv_policy": "dynsplit"})
        with pytest.raises(
            ValueError,
            match="custom_params.kv_policy 'quest' is not a policy of this server; "
            "it runs 'dynsplit', 'snapkv', 'fixed'",
        ):
            request_options.check({"kv_policy": "quest"})
        with pytest.raises(ValueError, match="custom_params.kv_budget 10 is too small for snapkv"):
            request_options.check({"kv_policy": "snapkv", "kv_budget": 10})
    finally:
        request_options.configure(None, None)
    with pytest.raises(ValueError, match="custom_params.kv_policy applies to a compressing policy"):
        request_options.check({"kv_policy": "snapkv"})


def test_dense_layers_are_those_of_each_request_policy():
    """A member's dense layers (Quest's `dense_layers`) hold for its own requests only."""
    from dynsplit_sglang.policies import QuestOptions

    kv = KVConfig("dynsplit", 64, DynSplitOptions(), variants={"q": QuestOptions(dense_layers=2, evict=False)})
    kv.validate()
    ps = build_policy(kv, SHAPE, 256, torch.float32, "cpu", FakeTokens())
    reqs = [
        RequestView(torch.arange(100), 99, torch.zeros(1, dtype=torch.int64), f"r{i}", row=i, budget=64, policy=label)
        for i, label in enumerate(["", "q", "dynsplit"])
    ]
    ps.begin_forward(reqs, True)
    assert ps.sparse_in_layer(0, [0, 1, 2]) == [0, 2] and ps.sparse_in_layer(1, [1]) == []
    assert ps.sparse_in_layer(2, [0, 1, 2]) == [0, 1, 2]
