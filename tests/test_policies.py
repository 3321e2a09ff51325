"""Every policy's selection on constructed attention patterns, against a hand-computed expectation.

The policies run here exactly as the backend drives them (begin_forward, observe_queries,
end_forward, select), on small fake KV buffers instead of a model.
"""

import dataclasses

import pytest
import torch

from dynsplit_sglang import request_options
from dynsplit_sglang.block_table import ModelShape
from dynsplit_sglang.config import KVConfig
from dynsplit_sglang.layer_budgets import dynamickv, group_pyramid, proportional, pyramid
from dynsplit_sglang.patches import prefix_reserve
from dynsplit_sglang.policies import (
    POLICY_CLASSES,
    DynamicKVOptions,
    DynSplitOptions,
    PyramidKVOptions,
    QuestOptions,
    RequestView,
    SepLLMOptions,
    SnapKVOptions,
    StreamingLLMOptions,
    WindowKVOptions,
)
from dynsplit_sglang.policies.windowkv import window_scores_by_rule
from dynsplit_sglang.splitter import split

SHAPE = ModelShape(num_layers=4, num_heads=4, num_kv_heads=2, head_dim=8)
SLOTS = 256


class FakeTokens:
    """A vocabulary of known texts (what delimiters.TokenTexts gives the policies)."""

    texts = ["word", " word", ".", ",", "?", " the", "\n", ";", "x"]
    vocab_size = len(texts)

    def mask(self, predicate):
        return torch.tensor([predicate(t) for t in self.texts])


def make_policy(options, budget):
    kv = KVConfig(policy=options.policy, budget=budget, options=options)
    kv.validate()
    return POLICY_CLASSES[options.policy](kv, SHAPE, SLOTS, torch.float32, "cpu", FakeTokens())


def prefill(policy, keys, n, budget, queries=None, token_ids=None, rid="r", start=0, prompt_len=None, evict=False):
    """Run positions start..n-1 of a request (slots = positions) through the policy as one
    prefill forward, as the backend does: the policy gets the queries of the prompt's last tokens
    among them. queries: [n, H, D] of every position; prompt_len: None, the prompt ends at n;
    evict: eviction is on for the request."""
    ids = torch.zeros(n, dtype=torch.int64) if token_ids is None else token_ids
    r = RequestView(torch.arange(n), start, ids[start:], rid, row=0, budget=budget, prompt_len=prompt_len, evict=evict)
    policy.begin_forward([r], False)
    mine = r.prompt_queries(policy.needs.query_window)
    for layer in sorted(policy.needs.query_layers):
        if mine.stop > mine.start:
            policy.observe_queries(layer, 0, queries[start:][mine], 1.0)
    policy.end_forward([r], [keys] * SHAPE.num_layers)
    return r


def decode_select(policy, keys, n, budget, q, layer=0, rid="r"):
    """One decode step at sequence length n (the new token in slot n-1); returns kept positions per KV head."""
    r = RequestView(torch.arange(n), n - 1, torch.zeros(1, dtype=torch.int64), rid, row=0, budget=budget)
    policy.begin_forward([r], True)
    positions, valid = policy.select(layer, 0, q)
    # the count the FlashInfer decode plans with, known on the host, is what was selected
    assert policy.selection_counts(layer, [0]) == [int(valid[0].sum())]
    assert (valid.sum(dim=1) == valid[0].sum()).all()
    policy.end_forward([r], [keys] * SHAPE.num_layers)
    return [set(p[v].tolist()) for p, v in zip(positions, valid)]


def test_streamingllm_keeps_exactly_sink_and_recent_and_rolls():
    policy = make_policy(StreamingLLMOptions(sink_tokens=4), budget=20)
    keys = torch.randn(SLOTS, 2, 8)
    prefill(policy, keys, 100, 20)
    expected = set(range(4)) | set(range(84, 101))
    kept = decode_select(policy, keys, 101, 20, torch.randn(4, 8))
    assert kept == [expected - {84}] * 2  # the generated token pushed out the oldest recent one
    for layer in range(SHAPE.num_layers):
        assert decode_select(policy, keys, 101, 20, torch.randn(4, 8), layer) == kept


def test_sepllm_keeps_initial_separators_and_recent():
    policy = make_policy(SepLLMOptions(initial_tokens=2, recent_tokens=5), budget=12)
    keys = torch.randn(SLOTS, 2, 8)
    ids = torch.zeros(60, dtype=torch.int64)  # "word"
    separators = [10, 20, 30, 40, 50, 52]
    ids[separators] = torch.tensor([2, 3, 4, 6, 7, 2])  # . , ? \n ; .
    ids[[15, 25]] = 5  # " the": a word with a space, not a separator
    prefill(policy, keys, 60, 12, token_ids=ids)
    # the sequence has 61 tokens: 2 initial + the generated one + 5 recent prompt tokens leave 4
    # places, which go to the newest separators.
    kept = decode_select(policy, keys, 61, 12, torch.randn(4, 8))
    assert kept == [{0, 1} | {55, 56, 57, 58, 59, 60} | {30, 40, 50, 52}] * 2


def test_quest_picks_the_page_with_the_highest_bound():
    policy = make_policy(QuestOptions(page_size=16, evict=False), budget=40)
    q = torch.zeros(4, 8)
    q[:, 0] = 1.0
    keys = torch.randn(SLOTS, 2, 8) * 0.1
    keys[37, :, 0] = 5.0  # page 2 (positions 32..47) holds the key that matches q
    keys[70, 1, 0] = 4.0  # page 4 wins for the second KV head only
    prefill(policy, keys, 100, 40)
    kept = decode_select(policy, keys, 101, 40, q)
    open_page = set(range(96, 101))
    assert set(range(32, 48)) <= kept[0] and set(range(64, 80)) <= kept[1]
    assert open_page <= kept[0] and open_page <= kept[1]
    assert all(len(k) <= 40 for k in kept)


def test_quest_dense_layers_attend_to_everything():
    """Quest's first `dense_layers` select for no request (the backend attends densely there)."""
    policy = make_policy(QuestOptions(page_size=16, dense_layers=1, evict=False), budget=40)
    keys = torch.randn(SLOTS, 2, 8)
    prefill(policy, keys, 100, 40)
    assert policy.sparse_in_layer(0, [0, 1]) == [] and policy.sparse_in_layer(1, [0, 1]) == [0, 1]
    assert len(decode_select(policy, keys, 101, 40, torch.randn(4, 8), layer=1)[0]) <= 40
    assert make_policy(QuestOptions(), budget=40).sparse_in_layer(0, [0]) == [0]


def window_pattern(n, hot):
    """Keys and queries where every query attends almost only to the `hot` positions."""
    keys = torch.zeros(SLOTS, 2, 8)
    queries = torch.zeros(n, 4, 8)
    queries[:, :, 0] = 1.0
    for p in hot:
        keys[p, :, 0] = 20.0
    return keys, queries


def test_snapkv_keeps_the_window_and_the_attended_tokens():
    n, hot = 120, [10, 50, 51]
    keys, queries = window_pattern(n, hot)
    policy = make_policy(SnapKVOptions(window=8, kernel_size=1), budget=12)
    prefill(policy, keys, n, 12, queries)
    kept = decode_select(policy, keys, n + 1, 12, torch.randn(4, 8))
    # budget 12 = the generated token + the window (112..119) + the 3 attended tokens
    assert kept == [set(hot) | set(range(112, 121))] * 2
    # two more generated tokens push out the lowest-ranked prompt tokens, never the window
    kept = decode_select(policy, keys, n + 3, 12, torch.randn(4, 8))
    assert all(len(k) == 12 and set(range(112, 123)) <= k and 10 in k for k in kept)


def test_snapkv_pooling_spreads_to_neighbours():
    n = 120
    keys, queries = window_pattern(n, [40])
    policy = make_policy(SnapKVOptions(window=8, kernel_size=5, pooling="max"), budget=8 + 5)
    prefill(policy, keys, n, 13, queries)
    kept = decode_select(policy, keys, n, 13, torch.randn(4, 8))  # a step at the prompt length
    assert kept == [set(range(38, 43)) | set(range(112, 120))] * 2


def test_pyramidkv_budgets_fall_with_depth_and_keep_the_mean():
    budgets = pyramid(100, 8, 20, cap=1000)
    assert sum(budgets) == 800 and budgets == sorted(budgets, reverse=True)
    assert budgets[0] == pytest.approx(195, abs=1) and budgets[-1] == pytest.approx(5, abs=1)
    capped = pyramid(100, 8, 20, cap=150)  # the first layer cannot take 195 of 150 tokens
    assert sum(capped) == 800 and max(capped) <= 150
    policy = make_policy(PyramidKVOptions(window=4), budget=30)
    n = 100
    keys, queries = window_pattern(n, [7])
    prefill(policy, keys, n, 30, queries)
    sizes = [len(decode_select(policy, keys, n + 1, 30, torch.randn(4, 8), layer)[0]) for layer in range(4)]
    assert sum(sizes) == 4 * 30 and sizes == sorted(sizes, reverse=True)


def test_dynamickv_budgets_sum_to_the_model_budget_and_follow_the_scores():
    torch.manual_seed(0)
    scores = torch.rand(4, 2, 200) * 0.01
    scores[1, :, :50] = 1.0  # layer 1 holds most of the global top scores
    scores[3, :, :20] = 1.0  # layer 3 some (10 on one head was within the noise: 1 seed in 10 failed)
    budgets = dynamickv(scores, 40, r_max=10, cap=200)
    assert sum(budgets) == 4 * 40
    assert budgets[1] == max(budgets) and budgets[1] > budgets[3] > max(budgets[0], budgets[2])
    assert all(b <= 200 for b in budgets)
    # through the policy: per-layer sizes sum to the whole-model budget
    policy = make_policy(DynamicKVOptions(window=4, kernel_size=1), budget=24)
    n = 100
    keys, queries = window_pattern(n, [3, 60])
    prefill(policy, keys, n, 24, queries)
    sizes = [len(decode_select(policy, keys, n + 1, 24, torch.randn(4, 8), layer)[0]) for layer in range(4)]
    assert sum(sizes) == 4 * 24


def test_dynamickv_recomputes_budgets_per_request():
    policy = make_policy(DynamicKVOptions(window=4, kernel_size=1), budget=24)
    keys, queries = window_pattern(100, [3])
    prefill(policy, keys, 100, 24, queries, rid="a")
    first = policy._rankings[0].budgets
    prefill(policy, keys, 100, 40, queries, rid="b")  # the same row, a new request and budget
    assert sum(policy._rankings[0].budgets) == 4 * 40 and sum(first) == 4 * 24


def test_windowkv_keeps_whole_windows_shared_by_heads_and_layers_of_a_group():
    n = 100
    keys, queries = window_pattern(n, [21])  # inside window 2 (positions 16..23)
    options = WindowKVOptions(review_window=8, shared_layers=2, suffix_max=8, suffix_mean=8, rule="max", beta=2)
    policy = make_policy(options, budget=8 + 8)
    prefill(policy, keys, n, 16, queries)
    sets = [decode_select(policy, keys, n, 16, torch.randn(4, 8), layer) for layer in range(4)]
    assert sets[0][0] == sets[0][1] == sets[1][0]  # shared by heads and by the group's layers
    assert set(range(16, 24)) <= sets[0][0] and set(range(92, 100)) <= sets[0][0]
    assert all(len(s[0]) <= 2 * 16 for s in sets)
    sizes = [len(s[0]) for s in sets]
    assert sum(sizes) <= 4 * 16 and sizes[0] >= sizes[2]


def test_windowkv_rules():
    scores = torch.tensor([[0.0, 0.0, 0.0, 4.0, 1.0, 1.0, 1.0, 1.0]])
    assert window_scores_by_rule(scores, 4, "max").tolist() == pytest.approx([2.0, 1.0])
    assert window_scores_by_rule(scores, 4, "mean").tolist() == pytest.approx([1.0, 1.0])
    policy = make_policy(WindowKVOptions(rule="auto"), budget=64)
    keys, queries = window_pattern(100, [5])
    ids = torch.zeros(100, dtype=torch.int64)
    prefill(policy, keys, 100, 64, queries, token_ids=ids)
    r = RequestView(torch.arange(100), 0, ids, "r", 0, 64)
    assert policy.rule_for(r) == "mean"
    ids[95] = 4  # "?" near the end of the prompt: a question, so localization ("max")
    prefill(policy, keys, 100, 64, queries, token_ids=ids)
    assert policy.rule_for(r) == "max"


def test_group_pyramid_and_proportional_allocations():
    budgets = group_pyramid(512, 32, 8, 14, cap=10_000)
    assert budgets[0] > budgets[8] > budgets[16] > budgets[24] and sum(budgets) <= 32 * 512
    assert sum(budgets) >= 32 * 512 - 4 * 8
    assert proportional([1, 1, 2], 10, cap=100) == [3, 2, 5]
    assert proportional([1, 100], 10, cap=6) == [4, 6]
    assert proportional([0, 0], 5, cap=100) == [3, 2]


@pytest.mark.parametrize(
    "name", ["snapkv", "pyramidkv", "dynamickv", "windowkv", "streamingllm", "sepllm", "quest", "dynsplit"]
)
def test_budget_covering_the_sequence_keeps_everything(name):
    options = KVConfig(policy=name).options
    if name == "dynsplit":
        options = dataclasses.replace(options, split="fixed_interval")  # no attention statistics needed
    policy = make_policy(options, budget=512)
    n = 100
    keys, queries = window_pattern(n, [3])
    prefill(policy, keys, n, 512, queries)
    assert decode_select(policy, keys, n + 1, 512, torch.randn(4, 8)) == [set(range(n + 1))] * 2


PREFILL_TIME = ["snapkv", "pyramidkv", "dynamickv", "windowkv", "streamingllm", "sepllm"]


@pytest.mark.parametrize("name", PREFILL_TIME)
def test_prefill_time_policies_know_their_counts_as_tokens_are_generated(name):
    """`decode_select` checks the host-side count against the selection in every layer (their
    budgets differ for pyramidkv and dynamickv), while the generated tokens are few, fill a
    layer's budget, and outgrow it."""
    budget, n = 64, 150  # n + 100 slots fit the fake KV buffers (SLOTS)
    policy = make_policy(KVConfig(policy=name).options, budget=budget)
    keys, queries = window_pattern(n, [3, 40])
    prefill(policy, keys, n, budget, queries)
    for m in (n + 1, n + 40, n + 100):
        for layer in range(SHAPE.num_layers):
            decode_select(policy, keys, m, budget, torch.randn(4, 8), layer=layer)
    # a request without a ranking (cannot happen) attends to its recent tokens, and counts them
    kept = decode_select(policy, keys, n + 1, budget, torch.randn(4, 8), rid="other")
    assert kept == [set(range(n + 1 - budget, n + 1))] * 2


@pytest.mark.parametrize("name", PREFILL_TIME)
def test_a_prompt_is_ranked_once_by_its_last_chunk_and_alone_after_a_retraction(name):
    """Chunked or not, and prefilled again with its generated tokens after SGLang retracted it,
    a request gets the ranking of its prompt: the same positions, budgets and prompt length, so
    the tokens it had generated stay generated tokens."""
    torch.manual_seed(0)
    budget, p, g = 48, 150, 30
    keys, queries = torch.randn(SLOTS, 2, 8), torch.randn(p + g, 4, 8)  # the window's queries matter

    def ranked(*forwards):
        policy = make_policy(KVConfig(policy=name).options, budget=budget)
        for start, end in forwards:
            assert policy.stats()["rankings"] == 0  # earlier chunks carry queries, rank nothing
            prefill(policy, keys, end, budget, queries, start=start, prompt_len=p)
        return policy, policy._rankings[0]

    whole, want = ranked((0, p))
    for forwards in (
        [(0, 60), (60, p - 3), (p - 3, p)],  # a chunk boundary inside the window
        [(0, p + g)],  # retracted: prompt and generated at once
        [(0, p - 2), (p - 2, p + g)],
    ):  # ... in two chunks
        policy, got = ranked(*forwards)
        assert (got.prompt_len, got.ranked, got.budgets) == (want.prompt_len, want.ranked, want.budgets), forwards
        assert torch.equal(got.order, want.order), forwards
        for layer in range(SHAPE.num_layers):
            q = torch.randn(4, 8)
            assert decode_select(policy, keys, p + g + 1, budget, q, layer) == decode_select(
                whole, keys, p + g + 1, budget, q, layer
            )


@pytest.mark.parametrize("name", PREFILL_TIME + ["dynsplit"])
def test_a_released_row_drops_what_its_request_left(name):
    """The host releases the rows SGLang freed (and those new requests take) at each prefill:
    rankings, DynamicKV layer budgets and carried queries go, other rows' stay."""
    options = (
        DynSplitOptions(layer_budgets="dynamickv", evict=False) if name == "dynsplit" else KVConfig(policy=name).options
    )
    policy = make_policy(options, budget=96)
    keys, queries = window_pattern(150, [3, 40])
    prefill(policy, keys, 100, 96, queries, prompt_len=150)  # an earlier chunk: queries carried
    held = policy.stats()
    prefill(policy, keys, 150, 96, queries, start=100, prompt_len=150)
    policy.release_rows({1, 2})
    assert policy.stats()["carried_queries"] == held["carried_queries"]
    assert policy.stats().get("rankings", policy.stats().get("layer_budgets")) == 1
    policy.release_rows({0})
    assert policy.stats()["carried_queries"] == 0
    assert policy.stats().get("rankings", policy.stats().get("layer_budgets")) == 0


def test_dynsplit_layer_budgets_come_from_the_prompt_alone():
    """DynSplit-KV's DynamicKV layer budgets score the prompt with its last queries, also when a
    retracted request prefills its generated tokens with it (random data gives uniform budgets,
    so what the scoring is given is compared)."""
    options = DynSplitOptions(
        split="fixed_interval", layer_budgets="dynamickv", sink_tokens=0, recent_tokens=8, evict=False
    )
    torch.manual_seed(0)
    keys, queries = torch.randn(SLOTS, 2, 8), torch.randn(190, 4, 8)
    given = []
    for forwards in ([(0, 160)], [(0, 100), (100, 190)]):  # fresh; retracted after 30 tokens
        policy = make_policy(options, budget=48)
        scored = policy._dynamickv_budgets
        policy._dynamickv_budgets = lambda r, window, k, scored=scored: (
            given.append((r.seq_len, window)) or scored(r, window, k)
        )
        for start, end in forwards:
            prefill(policy, keys, end, 48, queries, start=start, prompt_len=160)
    assert [n for n, _ in given] == [160, 160]
    assert given[0][1].keys() == given[1][1].keys()
    assert all(torch.equal(given[0][1][layer][0], given[1][1][layer][0]) for layer in given[0][1])


def test_dynsplit_with_dynamickv_layer_budgets():
    options = DynSplitOptions(
        split="fixed_interval", layer_budgets="dynamickv", sink_tokens=0, recent_tokens=8, evict=False
    )
    policy = make_policy(options, budget=48)
    n = 160
    keys, queries = window_pattern(n, [3, 100])
    prefill(policy, keys, n, 48, queries)
    budgets = policy._layer_budgets[0][1]
    assert sum(budgets) == 4 * 48 and min(budgets) >= options.always_kept
    sizes = [len(decode_select(policy, keys, n + 1, 48, torch.randn(4, 8), layer)[0]) for layer in range(4)]
    assert all(s <= b for s, b in zip(sizes, budgets))


# --- the splitter's ablation rules ---------------------------------------------------------------
def test_fixed_interval_cuts_every_c_tokens():
    cfg = DynSplitOptions(block_size=16, delta=4, split="fixed_interval")
    blocks = split(0, 100, None, torch.ones(100, dtype=torch.bool), cfg)
    assert [(b.start, b.end, b.decided_at) for b in blocks] == [(16 * i, 16 * i + 15, 16 * i + 15) for i in range(6)]


def test_punctuation_cuts_at_the_delimiter_closest_to_c():
    cfg = DynSplitOptions(block_size=16, delta=4, split="punctuation")
    cand = torch.zeros(200, dtype=torch.bool)
    cand[[12, 17, 19]] = True  # allowed ends 11 .. 19, ideal end 15
    blocks = split(0, 200, None, cand, cfg)
    assert blocks[0].end == 17 and blocks[0].decided_at == 19


def test_delimiter_type_weighting_prefers_the_type_that_scored_well_before():
    cfg = DynSplitOptions(block_size=16, delta=4, lookahead=8, weighting="delimiter_type")
    n = 200
    rows = torch.zeros(n, cfg.lookahead)
    cand = torch.zeros(n, dtype=torch.bool)
    ids = torch.zeros(n, dtype=torch.int64)
    cand[[14, 18]] = True  # first block: type 7 at 14, type 9 at 18
    ids[14], ids[18] = 7, 9
    for j in range(1, cfg.lookahead + 1):  # position 18 scores higher on its own ...
        rows[18 + j, j - 1] = 0.5
        rows[14 + j, j - 1] = 0.25
    assert split(0, n, rows, cand, DynSplitOptions(block_size=16, delta=4, lookahead=8))[0].end == 18
    # ... but type 7 scored 1.0 earlier in the sequence (the prior), so its mean wins
    prior = {7: (3.0, 3), 9: (0.0, 2)}
    assert split(0, n, rows, cand, cfg, ids, prior)[0].end == 14


# --- per-request budget and the radix reserve ----------------------------------------------------
def test_request_budget_is_checked_against_the_policy():
    request_options.configure(KVConfig(policy="snapkv", budget=512), 8192)
    request_options.check({"kv_budget": 256})
    request_options.check({"other": 1})
    for bad, message in [
        (0, "must be a positive number"),
        ("64", "must be a positive number"),
        (9000, "larger than the model's context length"),
        (16, "too small for snapkv"),
    ]:
        with pytest.raises(ValueError, match=message):
            request_options.check({"kv_budget": bad})
    with pytest.raises(ValueError, match="unknown custom_params key 'kv_budgt'; the KV options are kv_budget"):
        request_options.check({"kv_budgt": 256})
    request_options.configure(None, None)
    with pytest.raises(ValueError, match="this server runs --kv full"):
        request_options.check({"kv_budget": 256})


def test_prefix_reserve_leaves_the_window_of_the_requests_policy_to_recompute():
    from types import SimpleNamespace

    def req(custom_params=None, prompt=None):
        """A fresh request of `input_len` prompt tokens, or one retracted after its `prompt`."""
        return SimpleNamespace(
            sampling_params=SimpleNamespace(custom_params=custom_params), origin_input_ids=[0] * (prompt or 100)
        )

    original = lambda req, input_len: input_len - 1  # noqa: E731  SGLang's own limit
    prefix_reserve.set_reserve({"snapkv": 32, "dynsplit": 0, "wide": 64}, "snapkv")
    try:
        assert prefix_reserve.limit_prefix(original, req(), 100) == 68  # the --kv policy's window
        assert prefix_reserve.limit_prefix(original, req({"kv_budget": 50}, 10), 10) == 0
        assert prefix_reserve.limit_prefix(original, req({"kv_policy": "dynsplit"}), 100) == 99
        assert prefix_reserve.limit_prefix(original, req({"kv_policy": "wide"}), 100) == 36
        assert prefix_reserve.limit_prefix(original, req({"kv_policy": "unknown"}), 100) == 36  # the widest
        # retracted after 30 generated tokens: the window before the prompt's end is recomputed,
        # and for every policy at least the prompt's last token (the forward that ranks it)
        assert prefix_reserve.limit_prefix(original, req(None, 70), 100) == 38
        assert prefix_reserve.limit_prefix(original, req({"kv_policy": "dynsplit"}, 70), 100) == 69
    finally:
        prefix_reserve.set_reserve({}, "")
    assert prefix_reserve.limit_prefix(original, req(), 100) == 99


def test_delimiter_chars_choose_the_candidates():
    """`delimiter_chars` replaces the default delimiter set: here only sentence ends may end a block."""
    from dynsplit_sglang.policies import DynSplitOptions

    default = make_policy(DynSplitOptions(), 64).candidate_mask
    sentences = make_policy(DynSplitOptions(delimiter_chars=".?\n"), 64).candidate_mask
    # FakeTokens: "word", " word", ".", ",", "?", " the", "\n", ";", "x"
    assert default.tolist() == [False, False, True, True, True, False, True, True, False]
    assert sentences.tolist() == [False, False, True, False, True, False, True, False, False]
