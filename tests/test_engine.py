"""DynSplit-KV inside a real SGLang engine (tiny random Llama, fp32, CPU).

The invariants of the design: dense equivalence when the budget covers the sequence; identical
block boundaries and greedy output whether a prompt is prefilled at once, in small chunks, or
partly from the radix cache (also after another request shared and then left its prefix); no KV
slot or block record leaks. The block traces are read with eviction off (with it, a request's
positions close up after its prompt and a resend hits only its intact prefix;
tests/test_eviction_server.py holds eviction's own invariants); the leak check runs both ways.
"""

import pytest
import torch
from transformers import AutoConfig, AutoTokenizer

from dynsplit_sglang.testing.process_setup import in_sglang_processes
from tests.engine_utils import SAMPLE_TEXT, engine, flush, generate, read_trace

pytestmark = pytest.mark.server

LENGTHS = (300, 517, 950)
BUDGET = 128


@pytest.fixture(scope="module")
def prompts(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    ids = tok(SAMPLE_TEXT * 60, add_special_tokens=False).input_ids
    # Different lengths and different starting points, so the requests are not prefixes of each other.
    return [ids[7 * i : 7 * i + n] for i, n in enumerate(LENGTHS)]


def test_budget_covering_the_sequence_is_identical_to_full(tiny_model, prompts):
    with engine(tiny_model, kv="full") as eng:
        full, _ = generate(eng, prompts, max_new_tokens=16)
    with engine(tiny_model, kv="dynsplit", kv_budget=2048) as eng:
        dyn, _ = generate(eng, prompts, max_new_tokens=16)
    assert dyn == full


@pytest.fixture(scope="module")
def uncached(tiny_model, prompts, tmp_path_factory):
    """Reference: each prompt prefilled at once, no radix cache, sparse decode (budget 128), the
    whole KV resident."""
    trace = tmp_path_factory.mktemp("uncached") / "trace.jsonl"
    with engine(
        tiny_model,
        kv="dynsplit",
        kv_budget=BUDGET,
        disable_radix_cache=True,
        kv_config={"trace_path": str(trace), "evict": False},
    ) as eng:
        outputs, metas = generate(eng, prompts)
        flush(eng)
    blocks, flushes = read_trace(trace)
    return outputs, [blocks[m["id"]]["blocks"] for m in metas], flushes


def test_blocks_have_bounded_lengths(uncached, prompts):
    _, blocks, _ = uncached
    for prompt, bl in zip(prompts, blocks):
        assert bl[0][0] == 0
        for (_s0, e0), (s1, _e1) in zip(bl, bl[1:]):
            assert s1 == e0 + 1
        assert all(12 <= e - s + 1 <= 20 for s, e in bl)
        assert len(prompt) + 12 - (bl[-1][1] + 1) <= 28  # the open tail is at most C+Δ+lookahead


def test_blocks_end_at_the_tokenizers_delimiters(tiny_model, prompts, uncached):
    """The engine classifies tokens with the model's own tokenizer: each prompt block ends at a
    delimiter token whenever its end window holds one. (SGLang 0.5.23 leaves
    ServerArgs.tokenizer_path None when the tokenizer is the model's; reading that field once made
    every token a candidate, and the punctuation rule the same as fixed intervals.)"""
    from dynsplit_sglang.delimiters import TokenTexts, candidate_token_mask
    from dynsplit_sglang.policies import DynSplitOptions

    cfg = DynSplitOptions()
    vocab = AutoConfig.from_pretrained(tiny_model).vocab_size
    is_delimiter = candidate_token_mask(TokenTexts(tiny_model, vocab), "delimiters", vocab)
    _, blocks, _ = uncached
    checked = 0
    for prompt, bl in zip(prompts, blocks):
        ids = torch.tensor(prompt)
        for start, end in bl:
            lo = start + cfg.window_lo
            if lo + cfg.window_width > len(prompt):
                break  # decided in generated text
            if is_delimiter[ids[lo : lo + cfg.window_width]].any():
                assert is_delimiter[ids[end]], (start, end)
                checked += 1
    assert checked >= 30


def check_nothing_held(flushes) -> None:
    """Once every request has finished, no block record is held (a flush drops what finished
    requests left first, as the next prefill would) and every KV slot is free again."""
    (flush,) = flushes
    assert flush["before"]["records_in_use"] == 0 == flush["before"]["records_owned"]
    assert flush["kv_available"] == flush["kv_available_at_start"]


def test_no_leak_without_radix_cache(uncached):
    check_nothing_held(uncached[2])


def test_no_leak_with_eviction_without_radix_cache(tiny_model, prompts, tmp_path):
    """The default: evicting requests hold row-owned copies of their resident blocks' records."""
    trace = tmp_path / "trace.jsonl"
    kv_config = {"trace_path": str(trace), "evict": True}
    with engine(tiny_model, kv="dynsplit", kv_budget=BUDGET, disable_radix_cache=True, kv_config=kv_config) as eng:
        generate(eng, prompts)
        flush(eng)
    blocks, flushes = read_trace(trace)
    assert len(blocks) == len(prompts)
    assert flushes[0]["before"]["evicted_requests"] == len(prompts)
    check_nothing_held(flushes)


def test_chunked_prefill_and_radix_hits_match_one_uncached_run(tiny_model, prompts, uncached, tmp_path):
    ref_out, ref_blocks, _ = uncached
    trace = tmp_path / "trace.jsonl"
    with engine(
        tiny_model,
        kv="dynsplit",
        kv_budget=BUDGET,
        chunked_prefill_size=64,
        kv_config={"trace_path": str(trace), "evict": False},
    ) as eng:
        # 1) chunked prefill, all prompts in one batch of mixed lengths
        out, metas = generate(eng, prompts)
        assert out == ref_out
        blocks, _ = read_trace(trace)
        assert [blocks[m["id"]]["blocks"] for m in metas] == ref_blocks

        # 2) exact resend: the whole prompt comes from the radix cache
        out, metas = generate(eng, prompts)
        assert all(m["cached_tokens"] >= len(p) - 1 - 64 for m, p in zip(metas, prompts))
        assert out == ref_out
        blocks, _ = read_trace(trace)
        assert [blocks[m["id"]]["blocks"] for m in metas] == ref_blocks

        # 3) shared prefix that diverges: another request caches prompt[:cut] + its own tail,
        #    then the prompt reuses the prefix and must not see the other tail's boundaries.
        flush(eng)
        for prompt, want_out, want_blocks in zip(prompts, ref_out, ref_blocks):
            cut = len(prompt) * 2 // 3 + 5
            other = prompt[:cut] + prompt[:cut][::-1][:120]
            generate(eng, [other], max_new_tokens=4)
            (got,), (meta,) = generate(eng, [prompt])
            assert meta["cached_tokens"] >= cut - 64
            assert got == want_out
            blocks, _ = read_trace(trace)
            assert blocks[meta["id"]]["blocks"] == want_blocks

        flush(eng)
    _, flushes = read_trace(trace)
    assert len(flushes) == 2
    for event in flushes:
        assert event["before"]["records_in_use"] == event["before"]["records_owned"]
        assert event["after"]["records_in_use"] == 0
        assert event["kv_available"] == event["kv_available_at_start"]


def test_engine_rejects_bad_kv_arguments(tiny_model):
    import sglang as sgl

    with pytest.raises(ValueError, match="unknown policy 'sparse'; valid choices: full, dynsplit"):
        sgl.Engine(model_path=tiny_model, device="cpu", kv="sparse")
    with pytest.raises(ValueError, match="--kv-budget must be a positive number of tokens"):
        sgl.Engine(model_path=tiny_model, device="cpu", kv="dynsplit", kv_budget=0)


@pytest.mark.parametrize("fail_at", ["start", "forward"])
def test_a_failing_scheduler_fails_its_test_not_the_run(tiny_model, monkeypatch, fail_at):
    """SGLang kills its whole process tree (pytest too) when a subprocess fails; the tests'
    engine helper makes that an error of the one test, leaves no subprocess behind, and nothing
    that would hang the session's end (this test passing is the run going on)."""
    import psutil

    from tests.subprocess_failures import SubprocessFailed, child_pids, new_children

    before = child_pids()
    monkeypatch.setenv("FAIL_AT", fail_at)
    with pytest.raises(SubprocessFailed), in_sglang_processes("tests.failing_setup:install"):
        with engine(tiny_model, kv="dynsplit", kv_budget=128) as eng:
            generate(eng, [[1, 2, 3, 4]])
    psutil.wait_procs(new_children(before), timeout=10)
    assert child_pids() <= before
