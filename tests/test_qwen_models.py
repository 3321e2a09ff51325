"""Qwen-style attention (Qwen2: q/k/v biases; Qwen3: attention bias, q/k norms before RoPE) under
`--kv`, on tiny random models made offline like the tiny Llama (random biases and norm weights,
so a path that dropped them would change the outputs): a budget covering the sequence gives
`--kv full`'s tokens and logprobs, and a decode-time and a prefill-time policy run at a small
budget, where they attend to other tokens than `full` (other logprobs). A random model repeats
one token, so the logprobs are what tells the runs apart."""

import pytest
import torch
from transformers import AutoTokenizer

from dynsplit_sglang.default_model import tiny_model_path
from tests.engine_utils import SAMPLE_TEXT, engine, scored

pytestmark = pytest.mark.server

LENGTHS = (300, 517)
BUDGET = 96
NEW = 12


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_qwen_attention_under_kv(family):
    model = str(tiny_model_path(family))
    tok = AutoTokenizer.from_pretrained(model)
    ids = tok(SAMPLE_TEXT * 40, add_special_tokens=False).input_ids
    prompts = [ids[7 * i : 7 * i + n] for i, n in enumerate(LENGTHS)]
    with engine(model, kv="full") as eng:
        full, full_logprobs, _ = scored(eng, prompts, NEW)
    with engine(model, kv="dynsplit", kv_budget=BUDGET, kv_variants={"snapkv": {}}) as eng:
        covering, covering_logprobs, _ = scored(eng, prompts, NEW, kv_budget=2048)
        sparse = {policy: scored(eng, prompts, NEW, kv_policy=policy) for policy in ("dynsplit", "snapkv")}
    assert covering == full, f"{family}: a covering budget must give --kv full's tokens"
    torch.testing.assert_close(covering_logprobs, full_logprobs, atol=1e-4, rtol=0)
    for policy, (tokens, logprobs, figures) in sparse.items():
        assert [len(t) for t in tokens] == [NEW] * len(prompts), (policy, tokens)
        assert all(f["policy"] == policy and f["mean_attended_tokens"] <= BUDGET for f in figures), figures
        assert (logprobs - full_logprobs).abs().max() > 1e-3, f"{policy} at budget {BUDGET} attends like full"
