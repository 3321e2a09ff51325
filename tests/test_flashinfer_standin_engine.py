"""SGLang's own FlashInfer attention backend, run on the CPU on torch stand-ins for FlashInfer's
wrappers (dynsplit_sglang/testing/fake_flashinfer.py), in a real engine. It must give what SGLang's
torch-native backend gives: this is the ground a FlashInferAttnBackend subclass will be tested on
without a GPU. What it checks is SGLang's planning, index handling and the stand-ins' meaning;
FlashInfer's kernels themselves run only on a GPU."""

import pytest
from transformers import AutoTokenizer

from dynsplit_sglang.testing.process_setup import in_sglang_processes
from tests.engine_utils import SAMPLE_TEXT, engine

pytestmark = pytest.mark.server

# Run in the engines' processes: SGLang's FlashInfer backend module gets the stand-ins.
STANDINS = "dynsplit_sglang.testing.fake_flashinfer:install_in_sglang"


def answers(eng, prompts):
    out = eng.generate(
        input_ids=prompts,
        sampling_params={"temperature": 0, "max_new_tokens": 8, "ignore_eos": True},
        return_logprob=True,
    )
    return [
        (o["output_ids"], [lp for lp, *_ in o["meta_info"]["output_token_logprobs"]], o["meta_info"]["cached_tokens"])
        for o in out
    ]


def test_sglangs_flashinfer_backend_on_the_standins_matches_torch_native(tiny_model, monkeypatch):
    monkeypatch.setenv("SGLANG_FLASHINFER_WORKSPACE_SIZE", str(8 << 20))
    ids = AutoTokenizer.from_pretrained(tiny_model)(SAMPLE_TEXT * 10, add_special_tokens=False).input_ids
    first = [ids[:300], ids[5:205]]  # two prefills in one batch (ragged prefill), then decode
    hit = [ids[:300] + ids[400:430]]  # a radix hit: paged prefill over the cached prefix, merged
    with engine(tiny_model, kv="full") as eng:
        want = answers(eng, first) + answers(eng, hit)
    with in_sglang_processes(STANDINS), engine(tiny_model, attention_backend="flashinfer_standin") as eng:
        got = answers(eng, first) + answers(eng, hit)
    assert got[2][2] >= 256, "the third prompt should reuse the first one's cached prefix"
    for (g_ids, g_lp, _), (w_ids, w_lp, _) in zip(got, want):
        assert g_ids == w_ids
        assert g_lp == pytest.approx(w_lp, abs=1e-4)


@pytest.mark.parametrize("evict", [False, True], ids=["resident", "evicting"])
def test_dynsplit_on_the_flashinfer_backend_matches_the_torch_backend(tiny_model, monkeypatch, evict):
    """`--kv dynsplit --attention-backend dynsplit_flashinfer` (the FlashInferAttnBackend subclass)
    against the torch backend: the same blocks and selections, so the same tokens, and logprobs
    within the two attention implementations' rounding. A batch mixing a request within its
    budget (dense rows in the folded decode) and sparse ones, then a radix hit: of the whole
    first prompt with the KV resident, of its intact prefix only when the first request evicted
    (the decode then reads a closed-up sequence)."""
    monkeypatch.setenv("SGLANG_FLASHINFER_WORKSPACE_SIZE", str(8 << 20))
    ids = AutoTokenizer.from_pretrained(tiny_model)(SAMPLE_TEXT * 10, add_special_tokens=False).input_ids
    first = [ids[:300], ids[5:105], ids[9:420]]  # 100 tokens + 8 fit the budget of 128
    hit = [ids[:300] + ids[430:470]]
    kv = {"kv": "dynsplit", "kv_budget": 128, "kv_config": {"evict": evict}}
    with engine(tiny_model, **kv) as eng:
        want = answers(eng, first) + answers(eng, hit)
    with in_sglang_processes(STANDINS), engine(tiny_model, attention_backend="dynsplit_flashinfer", **kv) as eng:
        got = answers(eng, first) + answers(eng, hit)
    assert [g[2] for g in got] == [w[2] for w in want]
    assert got[3][2] >= (32 if evict else 256)
    for (g_ids, g_lp, _), (w_ids, w_lp, _) in zip(got, want):
        assert g_ids == w_ids
        assert g_lp == pytest.approx(w_lp, abs=1e-4)
