"""Eviction inside a real SGLang engine (tiny random Llama, fp32, CPU): every prefill-time policy
gives the same tokens with its private prompt compacted and given back as with its KV resident;
a request that hits a prefix an evicting request shared gets all of it; after a mixed load with
chunked prefill, radix hits, retraction and aborted requests, every slot is back.

SGLang checks its own pools as it runs here: the busy check after every step (available +
evictable + protected + each request's private KV = the pool) and the page invariants (no row
points at a free page), on top of its strict check whenever the scheduler goes idle.
"""

import asyncio
import json

import pytest
from transformers import AutoTokenizer

from tests.engine_utils import SAMPLE_TEXT, engine, flush, read_trace
from tests.test_policies import PREFILL_TIME

pytestmark = pytest.mark.server

BUDGET = 64
SYSTEM = 300  # tokens of the prompt the shared requests start with
CHECKS = {"SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY": "1", "SGLANG_CHECK_KV_PAGE_INVARIANTS": "1"}


@pytest.fixture(scope="module")
def prompts(tiny_model):
    """Two requests sharing a system prompt, and one of its own: 560, 630 and 700 tokens."""
    ids = AutoTokenizer.from_pretrained(tiny_model)(SAMPLE_TEXT * 80, add_special_tokens=False).input_ids
    system = ids[:SYSTEM]
    return [system + ids[1000:1260], system + ids[1400:1730], ids[2000:2700]]


DECODE_TIME = ["dynsplit", "quest"]


def engine_args(trace, **extra):
    # dynsplit's trace records the pool at each cache flush; the variants are the policies tested
    # (the decode-time ones evict only where the server turns it on: they then collect the
    # prompt queries their resident set is ranked with)
    return dict(
        kv="dynsplit",
        kv_budget=BUDGET,
        kv_config={"trace_path": str(trace), "evict": True},
        kv_variants=json.dumps(
            {
                **{name: {} for name in PREFILL_TIME},
                "quest": {"evict": True},
                # a resident set larger than every test prompt
                "wide": {"policy": "dynsplit", "evict": True, "resident": 20},
            }
        ),
        **extra,
    )


def generate(eng, prompts, policy, evict, new=12, budget=None):
    params = {"temperature": 0, "max_new_tokens": new, "ignore_eos": True}
    params["custom_params"] = {"kv_policy": policy, "kv_evict": evict}
    if budget is not None:
        params["custom_params"]["kv_budget"] = budget
    out = eng.generate(input_ids=prompts, sampling_params=params)
    return [o["output_ids"] for o in out], [o["meta_info"] for o in out]


# DynamicKV caps a layer's share at what the compacted slots hold when eviction is on, so its
# reference evicts too (radix cache off: compacted, and freed at once); its uncompacted twin is
# the radix-cache hit below, whose private part is no longer than what it keeps.
REFERENCE_EVICTS = {"dynamickv"}


@pytest.fixture(scope="module")
def reference(tiny_model, prompts, tmp_path_factory):
    """Every policy with its KV resident, each prompt prefilled whole (no radix cache)."""
    trace = tmp_path_factory.mktemp("reference") / "trace.jsonl"
    with engine(tiny_model, **engine_args(trace, disable_radix_cache=True)) as eng:
        return {name: generate(eng, prompts, name, evict=name in REFERENCE_EVICTS)[0] for name in PREFILL_TIME}


def answers_sharing_the_system_prompt(eng, prompts, name) -> list:
    """One request evicts, then another with the same system prompt hits all of it: their answers."""
    first, _ = generate(eng, prompts[:1], name, evict=True)
    second, (meta,) = generate(eng, prompts[1:2], name, evict=True)
    assert meta["cached_tokens"] >= SYSTEM
    return first + second


def check_pool(trace, flushes: int) -> list[dict]:
    _, events = read_trace(trace)
    assert len(events) == flushes
    for event in events:
        assert event["kv_available"] == event["kv_available_at_start"], "KV slots leaked"
        tables = {
            k: v
            for k, v in event["after"].items()
            if not k.startswith("evicted_") and not k.endswith("records_capacity")
        }
        assert tables and not any(tables.values()), tables  # every policy table is empty
    return events


def test_evicting_changes_no_token_and_shared_prefixes_keep_their_hits(
    tiny_model, prompts, reference, tmp_path, monkeypatch
):
    for name, value in CHECKS.items():
        monkeypatch.setenv(name, value)
    trace = tmp_path / "trace.jsonl"
    with engine(tiny_model, **engine_args(trace, chunked_prefill_size=64)) as eng:
        for name in PREFILL_TIME:
            flush(eng)
            miss, _ = generate(eng, prompts, name, evict=True)  # chunked, nothing cached: compacted
            hit, metas = generate(eng, prompts, name, evict=True)  # the tree holds each prompt up to its start
            assert miss == hit == reference[name], name
            assert all(m["cached_tokens"] >= len(p) - 2 * BUDGET for m, p in zip(metas, prompts))
            flush(eng)
            if name not in REFERENCE_EVICTS:  # eviction off: the KV stays, the tokens are the same
                assert generate(eng, prompts, name, evict=False)[0] == reference[name], name
                flush(eng)
            assert answers_sharing_the_system_prompt(eng, prompts, name) == reference[name][:2], name
        flush(eng)
    events = check_pool(trace, flushes=3 * len(PREFILL_TIME) - len(REFERENCE_EVICTS) + 1)
    # every policy compacted its misses: 3 + 1 + 1 requests each (the second hit a shared prefix)
    assert events[-1]["before"]["evicted_requests"] == 5 * len(PREFILL_TIME)


def test_decode_time_policies_evict_to_a_resident_set_a_hit_does_not_change(tiny_model, prompts, tmp_path, monkeypatch):
    """dynsplit and quest keep a resident set of whole blocks (2 x budget) and give the rest back;
    the set does not depend on the radix hit, so a request hitting a prefix another evicting
    request shared answers as it does uncached; with a budget, or a resident set, covering the
    prompt nothing is evicted and the tokens are those of eviction off."""
    for name, value in CHECKS.items():
        monkeypatch.setenv(name, value)
    trace = tmp_path / "trace.jsonl"
    with engine(tiny_model, **engine_args(trace, chunked_prefill_size=64)) as eng:
        for name in DECODE_TIME:
            flush(eng)
            covered = [generate(eng, prompts, name, evict, budget=700)[0] for evict in (True, False)]
            assert covered[0] == covered[1], name
            if name == "dynsplit":  # a resident set that holds the whole prompt: eviction off's tokens
                assert generate(eng, prompts, "wide", True)[0] == generate(eng, prompts, name, False)[0]
            flush(eng)
            uncached, _ = generate(eng, prompts, name, evict=True)  # chunked, nothing cached: compacted
            again, metas = generate(eng, prompts, name, evict=True)  # the tree holds each prompt up to its start
            assert again == uncached, name
            assert all(m["cached_tokens"] >= len(p) - 4 * BUDGET for m, p in zip(metas, prompts))
            flush(eng)
            assert answers_sharing_the_system_prompt(eng, prompts, name) == uncached[:2], name
        flush(eng)
    events = check_pool(trace, flushes=3 * len(DECODE_TIME) + 1)
    assert events[-1]["before"]["evicted_requests"] >= 5 * len(DECODE_TIME), events[-1]["before"]


async def _stream_and_abort(eng, ids, rid, chunks):
    """Stream a long answer and abort it after `chunks` chunks; returns how many arrived."""
    params = {"temperature": 0, "max_new_tokens": 400, "ignore_eos": True, "custom_params": {"kv_policy": "snapkv"}}
    received = 0
    async for _ in await eng.async_generate(input_ids=ids, sampling_params=params, stream=True, rid=rid):
        received += 1
        if received == chunks:
            eng.tokenizer_manager.abort_request(rid)
    return received


async def _mixed_load(eng, prompts):
    answers = [
        eng.async_generate(
            input_ids=prompts,
            sampling_params={
                "temperature": 0,
                "max_new_tokens": 12,
                "ignore_eos": True,
                "custom_params": {"kv_policy": name, "kv_evict": True},
            },
        )
        for name in PREFILL_TIME + DECODE_TIME
    ]
    # a request that finishes in its prefill (one token) releases a compacted prompt at once
    one_token = eng.async_generate(
        input_ids=prompts[1][::-1], sampling_params={"max_new_tokens": 1, "custom_params": {"kv_policy": "snapkv"}}
    )
    aborted = [_stream_and_abort(eng, prompts[2][:650], "abort-decode", chunks=3)]
    *results, single = await asyncio.gather(*answers, *aborted, one_token)
    assert len(single["output_ids"]) == 1
    return results[: len(answers)], results[len(answers) :]


def test_pool_is_whole_after_retraction_aborts_and_a_flush(tiny_model, prompts, reference, tmp_path, monkeypatch):
    """SGLANG_TEST_RETRACT makes SGLang retract decoding requests every few steps (they prefill
    again, partly from the radix cache, and compact again); one request is aborted while it
    decodes, one while its chunked prefill runs."""
    for name, value in {**CHECKS, "SGLANG_TEST_RETRACT": "1"}.items():
        monkeypatch.setenv(name, value)
    trace = tmp_path / "trace.jsonl"
    with engine(tiny_model, **engine_args(trace, chunked_prefill_size=64)) as eng:
        answered, aborted = eng.loop.run_until_complete(_mixed_load(eng, prompts))
        for name, outputs in zip(PREFILL_TIME, answered):
            assert [o["output_ids"] for o in outputs] == reference[name], name
        assert all(3 <= n < 400 for n in aborted)
        # aborted during its chunked prefill: 7,000 tokens in chunks of 64 outlast the 0.3 s before
        # the abort (2,100 tokens and 4 new ones once finished first on a quiet machine), and 400
        # new tokens keep it from finishing before the abort whatever the machine
        params = {"max_new_tokens": 400, "ignore_eos": True, "custom_params": {"kv_policy": "snapkv"}}
        request = eng.async_generate(input_ids=prompts[2] * 10, sampling_params=params, rid="abort-prefill")
        task = eng.loop.create_task(request)
        eng.loop.run_until_complete(asyncio.sleep(0.3))
        eng.tokenizer_manager.abort_request("abort-prefill")
        result = eng.loop.run_until_complete(task)
        assert result["meta_info"]["finish_reason"]["type"] == "abort"
        flush(eng)
    (event,) = check_pool(trace, flushes=1)
    # the first request of each prompt compacts; those that come after hit the tree up to its start
    assert event["before"]["evicted_requests"] >= len(prompts)
