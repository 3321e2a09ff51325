"""A bounded soak: an agent load with cancellations and memory pressure through the HTTP server.

8 agents x 3 turns share a 1,500-token system prompt and add 400-token tool outputs (tiny random
Llama, CPU, radix cache and chunked prefill on, eviction on by default). Every fourth request is
cancelled: streamed and dropped by the client, aborted with /abort_request while it decodes, or
aborted during a long chunked prefill (benchmarks/agent_load.py). The KV pool is small and
SGLANG_TEST_RETRACT makes SGLang retract decoding requests besides; SGLang checks its pools after
every busy step. Once the load is through, every request that was not cancelled has its answer,
the server answers a plain request, a cache flush succeeds, every KV slot is free again and no
per-request state is left in the backend (policy tables, eviction plans, requests per row,
compression figures), and the compression metrics counted every policy's requests.
Once on `--kv dynsplit`, once on a server running several policies side by side.
"""

import json
from dataclasses import replace

import pytest
import requests
from transformers import AutoConfig

from benchmarks.agent_load import AgentLoad, run, summary
from benchmarks.soak import per_request_tables, unowned_records
from dynsplit_sglang.testing.server import cpu_args, flush_cache, launch_server, scrape_metrics
from tests.engine_utils import read_trace

pytestmark = pytest.mark.server

LOAD = AgentLoad(agents=8, turns=3, system_tokens=1500, tool_tokens=400, new_tokens=16, cancel_every=4)
CHECKS = {
    "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY": "1",
    "SGLANG_CHECK_KV_PAGE_INVARIANTS": "1",
    "SGLANG_TEST_RETRACT": "1",
}
VARIANTS = {
    "quest": {},
    "snapkv": {},
    "dynamickv": {},
    "streamingllm": {},
    "resident": {"policy": "dynsplit", "evict": False},
}
SERVERS = {
    "dynsplit": ((), ()),
    "variants": (("--kv-variants", json.dumps(VARIANTS)), ("dynsplit", *VARIANTS)),
}


@pytest.mark.parametrize("server", SERVERS)
def test_agent_load_with_cancellations_leaves_nothing_behind(server, tiny_model, tmp_path, monkeypatch):
    for name, value in CHECKS.items():
        monkeypatch.setenv(name, value)
    extra, policies = SERVERS[server]
    load = replace(LOAD, policies=policies)
    trace, log = tmp_path / "trace.jsonl", tmp_path / "server.log"
    args = (
        *("--kv", "dynsplit", "--kv-budget", "128", "--kv-config", json.dumps({"trace_path": str(trace)})),
        *("--chunked-prefill-size", "256", "--enable-metrics"),
        *extra,
    )
    vocab = AutoConfig.from_pretrained(tiny_model).vocab_size
    with launch_server(tiny_model, *args, device_args=cpu_args(8000), log_path=str(log)) as url:
        outcomes = run(url, load, vocab)
        report = summary(outcomes, load)
        assert report["failed"] == 0, report["failures"]
        cancelled = sum(load.kind(o.agent, o.turn) != "answer" for o in outcomes)
        assert report["requests"] == load.agents * load.turns and cancelled == load.agents * load.turns // 4
        assert report["cancelled"] == cancelled and report["answered"] == report["requests"] - cancelled
        # the shared prefix stays shared: the agents' later turns find the system prompt cached
        later = [o for o in outcomes if o.turn > 0 and o.status == "answered"]
        assert sum(o.cached_tokens >= load.system_tokens for o in later) >= 0.9 * len(later), report
        reply = requests.post(url + "/generate", json={"text": "Hello", "sampling_params": {"max_new_tokens": 4}})
        assert reply.status_code == 200 and reply.json()["meta_info"]["completion_tokens"] == 4, reply.text
        # the metrics counted every policy's decode steps, each request's read at most what it held
        metrics = scrape_metrics(url)
        attended, held, context = (
            metrics[f"sglang:kv_compression_{k}_tokens_total"] for k in ("attended", "held", "context")
        )
        assert set(context) == set(policies or ["dynsplit"])
        assert all(0 < attended[p] <= held[p] <= context[p] for p in context), metrics
        flush_cache(url)
    assert "#retracted_reqs: " in log.read_text(errors="replace"), "SGLang never retracted a request"
    _, flushes = read_trace(trace)
    (flush,) = flushes
    assert flush["kv_available"] == flush["kv_available_at_start"], "KV slots leaked"
    before = flush["before"]
    held = per_request_tables(before)
    assert held and not any(held.values()), held  # what finished requests left is gone
    unowned = unowned_records(before)  # block records: only the tree's
    assert unowned and not any(unowned.values()), before
