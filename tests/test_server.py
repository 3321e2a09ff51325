"""The HTTP server with `--kv dynsplit` on the embedded SmolLM2-135M-Instruct: OpenAI chat API on
a long passkey prompt, the frontend language, what compression did (meta_info, /metrics,
/server_info), malformed requests (a 400 naming the problem, the server serving on), and clean
one-line startup errors."""

import json
import subprocess
import sys

import pytest
import requests
from transformers import AutoTokenizer

from dynsplit_sglang.passkey import is_correct, make_sample
from dynsplit_sglang.testing.server import launch_server, scrape_metrics

PROMPT_TOKENS = 2048


@pytest.fixture(scope="module")
def samples(smollm2):
    """Two fixed ~2k-token passkey prompts (key at depth 0.56 and 0.7). This checks the whole path
    (HTTP, chat template, dense prefill, DD-Select, sparse decode at 1/4 of the prompt) on
    prompts that the default configuration answers; the accuracy over many prompts and depths is
    what benchmarks/passkey.py reports (about 3 in 4 at this budget, see README)."""
    tok = AutoTokenizer.from_pretrained(smollm2)
    return [make_sample(tok, PROMPT_TOKENS, seed, depth) for seed, depth in ((1, None), (12, 0.7))]


@pytest.fixture(scope="module")
def server(smollm2, samples, tmp_path_factory):
    budget = min(s.num_tokens for s in samples) // 4
    log = tmp_path_factory.mktemp("server") / "server.log"
    args = ("--kv", "dynsplit", "--kv-budget", str(budget), "--enable-metrics")
    with launch_server(smollm2, *args, log_path=str(log)) as url:
        yield url, budget


@pytest.mark.server
def test_long_passkey_prompt_through_openai_chat_api(server, samples):
    from openai import OpenAI

    url, budget = server
    client = OpenAI(base_url=url + "/v1", api_key="none")
    for sample in samples:
        assert sample.num_tokens >= 2000 and budget <= sample.num_tokens / 4
        reply = client.chat.completions.create(model="default", messages=sample.messages, temperature=0, max_tokens=16)
        answer = reply.choices[0].message.content
        assert is_correct(sample, answer), (sample.answer, answer)
        assert reply.usage.prompt_tokens == sample.num_tokens


@pytest.mark.server
def test_server_reports_the_dynsplit_backend(server):
    url, _ = server
    info = requests.get(url + "/server_info", timeout=30).json()
    assert info["attention_backend"] == "dynsplit"


@pytest.mark.server
def test_frontend_language_fork_shares_the_prefix(server):
    import sglang as sgl

    url, _ = server

    @sgl.function
    def two_answers(s, context):
        s += sgl.user(context + "\nName one colour mentioned above.")
        forks = s.fork(2)
        for _i, f in enumerate(forks):
            f += sgl.assistant(sgl.gen("answer", max_tokens=8, temperature=0))
        s["answers"] = [f["answer"] for f in forks]

    sgl.set_default_backend(sgl.RuntimeEndpoint(url))
    state = two_answers.run(context="The grass is green. The sky is blue. " * 60)
    first, second = state["answers"]
    assert first == second and first.strip()


@pytest.mark.server
def test_compression_shows_in_meta_info_metrics_and_server_info(server, samples):
    url, budget = server
    # another system message than the passkey test's: a prompt the radix cache has not seen,
    # so eviction has a private part to give back
    messages = [{"role": "system", "content": "Find the pass key."}, *samples[0].messages]
    # the OpenAI chat API, with SGLang's return_meta_info
    reply = requests.post(
        url + "/v1/chat/completions",
        json={
            "model": "default",
            "messages": messages,
            "max_tokens": 8,
            "temperature": 0,
            "return_meta_info": True,
        },
        timeout=300,
    ).json()
    figures = reply["choices"][0]["meta_info"]["kv_compression"]
    prompt, completion = reply["usage"]["prompt_tokens"], reply["usage"]["completion_tokens"]
    assert len(figures) == 1
    kv = figures[0]
    assert (kv["policy"], kv["budget"], kv["evict"]) == ("dynsplit", budget, True)
    # the first token comes from the prefill; the overlap scheduler may run one step past the last
    assert kv["decode_steps"] in (completion - 1, completion)
    assert budget / 2 <= kv["mean_attended_tokens"] <= budget
    # eviction gave back all of the prompt but its resident set (2 x the budget; the few tokens of
    # the chat template's start may be a radix hit, which stays)
    assert prompt - 2 * budget - 32 <= kv["evicted_tokens"] <= prompt - 2 * budget
    # what it held at its last step, and what eviction gave back: its whole sequence
    assert kv["resident_tokens"] + kv["evicted_tokens"] == prompt + kv["decode_steps"]
    assert kv["mean_attended_tokens"] <= kv["mean_held_tokens"] < prompt

    # /generate, streamed: the last chunk carries it; a prompt within the budget attends densely
    with requests.post(
        url + "/generate",
        json={"text": "The sky is blue.", "sampling_params": {"max_new_tokens": 6, "ignore_eos": True}, "stream": True},
        stream=True,
        timeout=120,
    ) as r:
        chunks = [line for line in r.iter_lines() if line.startswith(b"data: {")]
    short = json.loads(chunks[-1][len(b"data: ") :])["meta_info"]["kv_compression"][0]
    assert short["decode_steps"] == 5 and short["evicted_tokens"] == 0
    assert short["mean_attended_tokens"] == short["mean_held_tokens"]

    metrics = scrape_metrics(url)
    assert metrics["sglang:kv_compression_attended_tokens_total"]["dynsplit"] > 0
    tokens = {
        k: metrics[f"sglang:kv_compression_{k}_tokens_total"]["dynsplit"] for k in ("attended", "held", "context")
    }
    assert tokens["context"] > 2 * tokens["attended"] and tokens["context"] > tokens["held"] >= tokens["attended"]
    assert metrics["sglang:kv_compression_evicted_tokens_total"]["dynsplit"] >= kv["evicted_tokens"]
    assert metrics["sglang:kv_compression_blocks_closed_total"]["dynsplit"] > prompt / 32
    assert metrics["sglang:kv_compression_selection_seconds_count"]["dynsplit"] >= kv["decode_steps"]
    assert metrics["sglang:kv_compression_selection_seconds_sum"]["dynsplit"] > 0
    # SGLang's own metrics are all there, the tokenizer's too (prometheus_client is imported late)
    assert "sglang:num_running_reqs" in metrics and "sglang:prompt_tokens_total" in metrics

    state = requests.get(url + "/server_info", timeout=30).json()["internal_states"][0]["kv"]
    assert (state["policy"], state["budget"], state["options"]["block_size"]) == ("dynsplit", budget, 16)
    assert state["evicted_tokens"] >= kv["evicted_tokens"] and state["evicted_requests"] >= 1
    assert state["compressed_layers"] == list(range(30))  # SmolLM2: every layer


# (what a client sends to /generate, what the 400 says)
MALFORMED = [
    (
        {"custom_params": {"kv_budget": "many"}},
        "custom_params.kv_budget must be a positive number of tokens, got 'many'",
    ),
    ({"custom_params": {"kv_budget": 0}}, "custom_params.kv_budget must be a positive number of tokens, got 0"),
    ({"custom_params": {"kv_budget": 1.5}}, "custom_params.kv_budget must be a positive number of tokens, got 1.5"),
    ({"custom_params": {"kv_budget": 100000}}, "custom_params.kv_budget 100000 is larger than the model's context"),
    ({"custom_params": {"kv_budget": 4}}, "custom_params.kv_budget 4 is too small for dynsplit"),
    ({"custom_params": {"kv_evict": "yes"}}, "custom_params.kv_evict must be true or false, got 'yes'"),
    ({"custom_params": {"kv_policy": "h2o"}}, "custom_params.kv_policy 'h2o' is not a policy of this server"),
    ({"custom_params": {"kv_budgt": 64}}, "unknown custom_params key 'kv_budgt'; the KV options are kv_budget"),
    ({"max_new_tokens": -1}, "max_new_tokens must be at least 0"),
]


@pytest.mark.server
def test_malformed_requests_get_a_400_naming_the_problem(server, smollm2):
    url, _ = server
    prompt = {"text": "The sky is blue. " * 20}
    for params, message in MALFORMED:
        reply = requests.post(url + "/generate", json={**prompt, "sampling_params": params}, timeout=60)
        assert reply.status_code == 400 and message in reply.text, (params, reply.status_code, reply.text)
    for body, message in [
        ({"input_ids": []}, "input_ids cannot be empty"),
        ({"input_ids": [1] * 9000}, "The input (9000 tokens) is longer than the model's context length (8192"),
    ]:
        reply = requests.post(url + "/generate", json={**body, "sampling_params": {"max_new_tokens": 4}}, timeout=60)
        assert reply.status_code == 400 and message in reply.text, (reply.status_code, reply.text)
    # the OpenAI API takes custom_params too, and refuses a bad one the same way
    reply = requests.post(
        url + "/v1/chat/completions",
        json={"model": "default", "messages": [{"role": "user", "content": "Hi"}], "custom_params": {"kv_budget": 0}},
        timeout=60,
    )
    assert reply.status_code == 400 and "custom_params.kv_budget must be a positive number" in reply.text, reply.text
    # ... and the server answers as before, with a valid per-request budget too
    for params in ({}, {"custom_params": {"kv_budget": 64, "kv_evict": False}}):
        reply = requests.post(
            url + "/generate", json={**prompt, "sampling_params": {"max_new_tokens": 4, **params}}, timeout=120
        )
        assert reply.status_code == 200 and reply.json()["meta_info"]["completion_tokens"] == 4, reply.text


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--kv", "foo"], "argument --kv: invalid choice: 'foo' (choose from 'full', 'dynsplit', 'quest'"),
        (
            ["--kv", "snapkv", "--kv-config", '{"block_size": 8}'],
            "unknown key(s) block_size for --kv snapkv; valid keys: evict, window",
        ),
        (["--kv", "windowkv", "--kv-budget", "20"], "--kv-budget 20 is too small for windowkv"),
        (["--kv", "dynsplit", "--kv-budget", "0"], "argument --kv-budget: must be a positive number of tokens, got 0"),
        (
            ["--kv", "dynsplit", "--kv-budget", "9000"],
            "--kv-budget 9000 is larger than the model's context length (8192)",
        ),
        (
            ["--kv", "dynsplit", "--kv-config", '{"block_size": 4, "delta": 4}'],
            "'block_size' (C=4) must be larger than 'delta'",
        ),
        (["--kv", "dynsplit", "--kv-config", "{oops"], "argument --kv-config: is not valid JSON"),
        (
            ["--kv", "dynsplit", "--speculative-algorithm", "EAGLE"],
            "--kv dynsplit does not support speculative decoding",
        ),
        (["--kv", "dynsplit", "--attention-backend", "triton"], "--kv dynsplit chooses the attention backend itself"),
        (
            ["--kv", "dynsplit", "--cuda-graph-backend-decode", "full"],
            "--kv dynsplit cannot capture decode as one full CUDA graph",
        ),
        (
            [
                "--kv",
                "quest",
                "--attention-backend",
                "dynsplit_flashinfer",
                "--cuda-graph-config",
                '{"decode": {"backend": "full"}}',
            ],
            "--kv quest cannot capture decode as one full CUDA graph",
        ),
        (
            ["--kv", "dynsplit", "--kv-config", '{"score_layers": [3, 30]}'],
            "'score_layers' [3, 30] out of range; the model has 30",
        ),
    ],
)
def test_bad_flags_stop_startup_with_one_clear_line(smollm2, flags, message, capsys):
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import prepare_server_args

    load_plugins()
    args = ["--model-path", smollm2, "--device", "cpu", *flags]
    with pytest.raises(SystemExit) as e:
        prepare_server_args(args)
    assert e.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("sglang serve: error: ") and message in last


@pytest.mark.server
def test_bad_flag_through_the_real_command(smollm2):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sglang.launch_server",
            "--model-path",
            smollm2,
            "--device",
            "cpu",
            "--kv",
            "dynsplit",
            "--kv-budget",
            "-3",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.strip().splitlines()[-1]
        == "sglang serve: error: argument --kv-budget: must be a positive number of tokens, got -3"
    )
