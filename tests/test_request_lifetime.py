"""A request's own KV options (custom_params.kv_budget, kv_policy) hold for its whole life: when
SGLang retracts it under memory pressure and prefills it again in another row, and not beyond
it, when a later request reuses its id."""

import gc
import json
from types import SimpleNamespace

import pytest
from transformers import AutoTokenizer

from dynsplit_sglang import request_options
from dynsplit_sglang.config import KVConfig
from dynsplit_sglang.policies import DynSplitOptions
from dynsplit_sglang.testing.process_setup import in_sglang_processes
from tests.engine_utils import SAMPLE_TEXT, engine


class FakeReq:
    """What request_options reads of SGLang's Req (which, like this, can be weakly referenced)."""

    def __init__(self, rid, custom_params=None, prompt_len=5):
        self.rid = rid
        self.sampling_params = SimpleNamespace(custom_params=custom_params)
        self.origin_input_ids = list(range(prompt_len))


@pytest.fixture
def recording():
    request_options.enable(KVConfig("dynsplit", 128, DynSplitOptions()))
    yield
    request_options.enable(KVConfig("full"))


def test_options_last_as_long_as_the_request(recording):
    req = FakeReq("a", {"kv_budget": 64, "kv_policy": "fixed"})
    request_options.record(req)
    # read as often as the request prefills (a retracted request prefills again)
    assert request_options.options("a") == request_options.options("a") == request_options.RequestOptions(64, "fixed")
    req.origin_input_ids = req.origin_input_ids[:3]  # the scheduler may cut an overlong prompt
    assert request_options.prompt_len("a") == 3
    del req
    gc.collect()
    assert request_options.options("a") == request_options.RequestOptions()
    assert request_options.prompt_len("a") is None


def test_a_reused_request_id_gets_its_own_options(recording):
    first = FakeReq("a", {"kv_budget": 64})
    request_options.record(first)
    second = FakeReq("a", {"kv_policy": "fixed"})
    request_options.record(second)
    assert request_options.options("a") == request_options.RequestOptions(None, "fixed")
    del first
    gc.collect()  # the first request's end does not take the second one's options
    assert request_options.options("a") == request_options.RequestOptions(None, "fixed")
    third = FakeReq("a", prompt_len=9)  # a third without options gets the server's
    request_options.record(third)
    assert request_options.options("a") == request_options.RequestOptions()
    assert request_options.prompt_len("a") == 9


@pytest.mark.server
def test_a_retracted_request_keeps_its_budget_policy_and_prompt(tiny_model, monkeypatch, tmp_path):
    """SGLANG_TEST_RETRACT makes SGLang retract a decoding request every few steps; each prefill
    and decode of every request must still get the budget and policy it asked for, and a
    prefill-time policy must rank its prompt alone (not the tokens generated before the
    retraction), with the prompt's last queries recomputed."""
    ids = AutoTokenizer.from_pretrained(tiny_model)(SAMPLE_TEXT * 10, add_special_tokens=False).input_ids
    prompts = [ids[:300], ids[7:260], ids[13:330]]
    # SGLang retracts the longest prompt, the last, which then prefills again each time the
    # others have decoded a few steps: in its own row, and once they are done in another one.
    asked = [{}, {"kv_budget": 96}, {"kv_budget": 64, "kv_policy": "snap"}]
    want = [(128, "dynsplit"), (96, "dynsplit"), (64, "snap")]  # the first: the server's
    log = tmp_path / "forwards.jsonl"
    monkeypatch.setenv("FORWARD_LOG", str(log))
    monkeypatch.setenv("SGLANG_TEST_RETRACT", "1")
    with (
        in_sglang_processes("tests.forward_log:install"),
        engine(
            tiny_model, kv="dynsplit", kv_budget=128, kv_variants={"snap": {"policy": "snapkv", "window": 8}}
        ) as eng,
    ):
        outs = eng.generate(
            input_ids=prompts,
            sampling_params=[
                {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True, "custom_params": c} for c in asked
            ],
        )
        # the next prefill finds the finished request's ranking dropped (its row is free)
        last = eng.generate(input_ids=ids[:40], sampling_params={"temperature": 0, "max_new_tokens": 2})
    rids = [o["meta_info"]["id"] for o in outs]
    forwards = [json.loads(line) for line in log.read_text().splitlines()]
    assert max(f["stats"]["snap.rankings"] for f in forwards) == 1  # never a stale one besides
    lasts = [f for f in forwards if f["reqs"][0][0] == last["meta_info"]["id"]]
    assert lasts[0]["stats"]["snap.rankings"] == 0
    forwards = [f for f in forwards if f not in lasts]  # the three requests' forwards
    prefills = [rid for f in forwards if not f["decode"] for rid, *_ in f["reqs"]]
    assert prefills.count(rids[2]) > 1, "the request was not retracted"
    rows = {row for f in forwards for rid, _, _, row, *_ in f["reqs"] if rid == rids[2]}
    assert len(rows) > 1, "the retracted request never came back in another row"
    for f in forwards:
        for rid, budget, policy, _, prompt_len, new_start, ranked, gap in f["reqs"]:
            i = rids.index(rid)
            assert (budget, policy, prompt_len + gap) == (*want[i], len(prompts[i])), (rid, f)
            if i == 2 and not f["decode"]:
                assert new_start <= len(prompts[2]) - 8, f  # the window was recomputed
            if i == 2 and f["decode"]:
                assert ranked == len(prompts[2]), f
