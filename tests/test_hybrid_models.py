"""A hybrid sliding-window model (Gemma 3's layout: two sliding-window layers per global layer,
here a tiny random one with a 16-token window) under `--kv`: the policies compress the global
layers only and the sliding layers keep SGLang's own windowed attention (hybrid_layers.py).

- a budget covering the sequence gives `--kv full`'s tokens and logprobs;
- at a small budget the policies attend sparsely, and eviction changes no prefill-time policy's
  output: it compacts the global layers only and leaves the window the sliding layers read in
  place, also where the policy keeps fewer tokens than the window (StreamingLLM at 12);
- chunked prefill and radix hits give one uncached run's output;
- nothing leaks; the FlashInfer backend refuses the model in one line.
"""

import pytest
import torch
from transformers import AutoTokenizer

from dynsplit_sglang.default_model import tiny_model_path
from tests.engine_utils import SAMPLE_TEXT, engine, flush, scored
from tests.test_eviction_server import check_pool

pytestmark = pytest.mark.server

LENGTHS = (300, 517, 700)
BUDGET = 96
WINDOW = 16  # the tiny model's sliding_window: a sliding layer reads a token's last 16
SMALL = {"streamingllm": 12}  # a policy keeping fewer prompt tokens than the window


@pytest.fixture(scope="module")
def model():
    return str(tiny_model_path("gemma3"))


@pytest.fixture(scope="module")
def prompts(model):
    ids = AutoTokenizer.from_pretrained(model)(SAMPLE_TEXT * 60, add_special_tokens=False).input_ids
    return [ids[7 * i : 7 * i + n] for i, n in enumerate(LENGTHS)]


@pytest.fixture(scope="module")
def full(model, prompts):
    with engine(model, kv="full") as eng:
        return scored(eng, prompts)


def sparse_runs(eng, prompts, evict: bool) -> dict:
    return {
        policy: scored(eng, prompts, kv_policy=policy, kv_budget=SMALL.get(policy, BUDGET), kv_evict=evict)
        for policy in ("dynsplit", "snapkv", "streamingllm")
    }


@pytest.fixture(scope="module")
def compressed(model, prompts, tmp_path_factory):
    """One dynsplit engine with snapkv and streamingllm beside it, no radix cache: covering
    budgets, then each policy at a small budget with eviction off and on; its trace."""
    trace = tmp_path_factory.mktemp("hybrid") / "trace.jsonl"
    with engine(
        model,
        kv="dynsplit",
        kv_budget=BUDGET,
        kv_variants={"snapkv": {}, "streamingllm": {}},
        kv_config={"trace_path": str(trace)},
        disable_radix_cache=True,
    ) as eng:
        covering = {policy: scored(eng, prompts, kv_policy=policy, kv_budget=2048) for policy in ("dynsplit", "snapkv")}
        resident, evicting = sparse_runs(eng, prompts, evict=False), sparse_runs(eng, prompts, evict=True)
        flush(eng)
    return covering, resident, evicting, trace


def test_a_covering_budget_gives_full_attentions_output(full, compressed):
    covering = compressed[0]
    for policy, (tokens, logprobs, _) in covering.items():
        assert tokens == full[0], policy
        torch.testing.assert_close(logprobs, full[1], atol=1e-4, rtol=0)


def test_policies_run_sparse_on_the_global_layers(full, compressed):
    for policy, (_, logprobs, figures) in compressed[1].items():
        budget = SMALL.get(policy, BUDGET)
        assert all(f["policy"] == policy and f["mean_attended_tokens"] <= budget for f in figures), figures
        assert (logprobs - full[1]).abs().max() > 1e-3, f"{policy} at budget {budget} attends like full"


def test_eviction_keeps_the_window_and_changes_no_output(prompts, compressed):
    """A prefill-time policy's tokens are the same with eviction on (dynsplit's resident set,
    2 x budget, is its own choice: it evicts, but answers as its resident set lets it)."""
    _, resident, evicting, _ = compressed
    for policy in resident:
        evicted = [f["evicted_tokens"] for f in evicting[policy][2]]
        assert all(0 < e <= len(p) - WINDOW for e, p in zip(evicted, prompts)), (policy, evicted)
        assert all(f["evicted_tokens"] == 0 for f in resident[policy][2]), policy
    for policy in ("snapkv", "streamingllm"):
        assert evicting[policy][0] == resident[policy][0], policy
        torch.testing.assert_close(evicting[policy][1], resident[policy][1], atol=1e-5, rtol=0)
    # StreamingLLM keeps 12 prompt tokens, the sliding layers read 16: everything before them goes
    assert [f["evicted_tokens"] for f in evicting["streamingllm"][2]] == [len(p) - WINDOW for p in prompts]


def test_nothing_leaks(compressed):
    (event,) = check_pool(compressed[3], flushes=1)
    assert event["before"]["evicted_requests"] == 3 * len(LENGTHS)


def test_chunked_prefill_and_radix_hits_match_one_uncached_run(model, prompts, compressed):
    want = compressed[1]["dynsplit"]
    with engine(model, kv="dynsplit", kv_budget=BUDGET, chunked_prefill_size=64, kv_config={"evict": False}) as eng:
        first = scored(eng, prompts)
        resend = scored(eng, prompts)
        cached = eng.generate(input_ids=prompts[:1], sampling_params={"max_new_tokens": 1})[0]["meta_info"]
    assert cached["cached_tokens"] >= len(prompts[0]) - 64
    for got in (first, resend):
        assert got[0] == want[0]
        torch.testing.assert_close(got[1], want[1], atol=1e-4, rtol=0)


def test_the_flashinfer_backend_refuses_sliding_layers_in_one_line(model):
    with pytest.raises(ValueError) as error:
        with engine(model, kv="dynsplit", kv_budget=BUDGET, attention_backend="dynsplit_flashinfer"):
            pass
    message = str(error.value)
    assert "dynsplit_flashinfer does not support sliding-window layers yet" in message and "\n" not in message
