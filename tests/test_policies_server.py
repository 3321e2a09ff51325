"""Every `--kv` policy serves real requests through the HTTP server on the embedded SmolLM2.

Chunked prefill (128-token chunks, so the 389-token prompt ends in a 5-token chunk: prefill-time
policies must join the observation window across chunks) and the radix cache on. A batch of three
prompts of mixed lengths is answered at a sparse budget; the same batch again (a radix hit) must
give the same tokens; the same prompts with a per-request budget that covers them must give
exactly `--kv full`'s tokens; a bad per-request budget or policy is refused with a message and
the server keeps serving.

`--kv dynsplit` and `--kv snapkv` (one decode-time, one prefill-time policy) run on servers of
their own; one more server runs every policy side by side (`--kv-variants`), each request naming
its policy, and must give the one-policy servers' tokens for theirs.
"""

import json

import pytest
import requests
from transformers import AutoTokenizer

from dynsplit_sglang.testing.server import launch_server, scrape_metrics
from tests.engine_utils import SAMPLE_TEXT

pytestmark = pytest.mark.server

LENGTHS = (300, 389, 520)
BUDGET = 96
COMMON = ("--chunked-prefill-size", "128")
ALONE = ("dynsplit", "snapkv")
VARIANTS = {
    "dynsplit+dynamickv": {"policy": "dynsplit", "layer_budgets": "dynamickv", "evict": False},
    "quest": {},
    "snapkv": {},
    "pyramidkv": {},
    "dynamickv": {},
    "windowkv": {},
    "streamingllm": {},
    "sepllm": {},
    # SmolLM2's 30 layers: dense everywhere (a dense layer reads the whole prompt: no eviction)
    "quest-dense": {"policy": "quest", "dense_layers": 30, "evict": False},
}
_alone_outputs: dict[str, list] = {}


@pytest.fixture(scope="module")
def prompts(smollm2):
    tok = AutoTokenizer.from_pretrained(smollm2)
    ids = tok(SAMPLE_TEXT * 40, add_special_tokens=False).input_ids
    return [ids[11 * i : 11 * i + n] for i, n in enumerate(LENGTHS)]


def replies(url, prompts, **custom) -> list[dict]:
    params = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}
    if custom:
        params["custom_params"] = custom
    reply = requests.post(url + "/generate", json={"input_ids": prompts, "sampling_params": params}, timeout=300)
    assert reply.status_code == 200, reply.text
    return reply.json()


def generate(url, prompts, **custom):
    return [r["output_ids"] for r in replies(url, prompts, **custom)]


def compression(answers: list[dict]) -> list[dict]:
    """What compression did for each answer (meta_info["kv_compression"])."""
    figures = [a["meta_info"]["kv_compression"] for a in answers]
    assert all(len(f) == 1 for f in figures)
    return [f[0] for f in figures]


def refused(url, prompt, custom):
    reply = requests.post(
        url + "/generate",
        timeout=60,
        json={
            "input_ids": prompt,
            "sampling_params": {"max_new_tokens": 4, "custom_params": custom},
        },
    )
    assert reply.status_code == 400, reply.text
    return reply.text


@pytest.fixture(scope="module")
def full_outputs(smollm2, prompts):
    with launch_server(smollm2, "--attention-backend", "torch_native", "--enable-metrics", *COMMON) as url:
        # KV options mean nothing to --kv full: refused, not ignored
        assert "this server runs --kv full" in refused(url, prompts[0], {"kv_budget": 64})
        answers = replies(url, prompts)
        # and it shows no compression: no meta_info, no metrics, nothing in /server_info
        assert not any("kv_compression" in a["meta_info"] for a in answers)
        metrics = scrape_metrics(url)
        assert "sglang:num_running_reqs" in metrics and not any(k.startswith("sglang:kv_compression_") for k in metrics)
        assert "kv" not in requests.get(url + "/server_info", timeout=30).json()["internal_states"][0]
        return [a["output_ids"] for a in answers]


def check_policy(url, prompts, full_outputs, label, **policy) -> list:
    """Miss, hit, a covering budget and a bad budget for the policy `label`; returns the miss
    tokens."""
    requests.post(url + "/flush_cache?timeout=60", timeout=90).raise_for_status()  # the next batch is a miss
    answers = replies(url, prompts, **policy)
    miss = [a["output_ids"] for a in answers]
    hit = generate(url, prompts, **policy)
    assert hit == miss, f"a radix-cache hit changed the output of {policy or 'the --kv policy'}"
    assert all(len(o) == 12 for o in miss)
    for f in compression(answers):
        assert (f["policy"], f["budget"], f["decode_steps"]) == (label, BUDGET, 11), f
        assert f["mean_attended_tokens"] <= f["mean_held_tokens"], f
    covering = replies(url, prompts, kv_budget=2048, **policy)
    assert [a["output_ids"] for a in covering] == full_outputs, "a budget covering the sequence must be dense"
    for f in compression(covering):
        assert f["mean_attended_tokens"] == f["mean_held_tokens"] and f["evicted_tokens"] == 0, f
    assert "custom_params.kv_budget must be a positive number" in refused(url, prompts[0], {"kv_budget": 0, **policy})
    return miss


@pytest.mark.parametrize("policy", ALONE)
def test_policy_serves_requests(policy, smollm2, prompts, full_outputs, tmp_path):
    args = ("--kv", policy, "--kv-budget", str(BUDGET), *COMMON)
    with launch_server(smollm2, *args, log_path=str(tmp_path / "server.log")) as url:
        assert requests.get(url + "/server_info", timeout=30).json()["attention_backend"] == "dynsplit"
        miss = check_policy(url, prompts, full_outputs, policy)
        assert generate(url, prompts[:1]) == miss[:1]
        _alone_outputs[policy] = miss


def test_one_server_runs_every_policy(smollm2, prompts, full_outputs, tmp_path):
    args = ("--kv", "dynsplit", "--kv-budget", str(BUDGET), "--kv-variants", json.dumps(VARIANTS), *COMMON)
    outputs = {}
    with launch_server(smollm2, *args, "--enable-metrics", log_path=str(tmp_path / "server.log")) as url:
        for label in ("dynsplit", *VARIANTS):
            outputs[label] = check_policy(url, prompts, full_outputs, label, kv_policy=label)
        # one series per policy; Quest with every layer dense reads every token, the others fewer
        metrics = scrape_metrics(url)
        attended, context = (
            metrics["sglang:kv_compression_attended_tokens_total"],
            metrics["sglang:kv_compression_context_tokens_total"],
        )
        assert set(context) == {"dynsplit", *VARIANTS}
        assert attended["quest-dense"] == context["quest-dense"]
        assert all(attended[label] < context[label] for label in context if label != "quest-dense")
        # without kv_policy a request gets the --kv policy
        assert generate(url, prompts) == outputs["dynsplit"]
        message = refused(url, prompts[0], {"kv_policy": "h2o"})
        assert "custom_params.kv_policy 'h2o' is not a policy of this server" in message
        assert generate(url, prompts[:1], kv_policy="windowkv") == outputs["windowkv"][:1]
    for policy, tokens in _alone_outputs.items():
        assert outputs[policy] == tokens, f"{policy} among variants differs from {policy} alone"
    assert len({json.dumps(o) for o in outputs.values()}) > 3, "the policies should not all attend alike"
    assert outputs["quest-dense"] == full_outputs, "Quest's dense layers must attend to every token"
