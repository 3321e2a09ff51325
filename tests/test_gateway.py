"""Two `--kv dynsplit` replicas behind SGLang's model gateway (`python -m dynsplit_sglang.serve_dp`,
smg with cache-aware routing), on the tiny model, one core each.

An agent load (8 conversations of 3 turns, four kinds of agent with a 600-token system prompt
each) through the gateway: every request is answered, every conversation's turns go to one
replica (the gateway's x-smg-routed-worker-id header, checked against the replicas' own request
counters), both replicas serve, and the cached share of the prompts is within a few points of the
same load on one replica alone. After a flush through the gateway, neither replica holds a KV
slot or a per-request entry (each replica's flush trace). The OpenAI chat API works through it.
"""

import json
from collections import defaultdict
from dataclasses import replace

import pytest
import requests
from transformers import AutoConfig

from benchmarks.agent_load import AgentLoad, run, summary
from benchmarks.soak import per_request_tables
from dynsplit_sglang.testing.server import cpu_args, flush_cache, scrape_metrics, start_dp
from tests.engine_utils import read_trace

pytestmark = pytest.mark.server

LOAD = AgentLoad(agents=8, turns=3, system_tokens=600, tool_tokens=200, new_tokens=8, systems=4, seed=5)


def requests_served(url: str) -> float:
    return sum(scrape_metrics(url).get("sglang:num_requests_total", {}).values())


def test_agent_load_through_the_gateway(tiny_model, tmp_path):
    trace = str(tmp_path / "trace-{replica}.jsonl")
    args = ("--kv", "dynsplit", "--kv-budget", "128", "--kv-config", json.dumps({"trace_path": trace}))
    vocab = AutoConfig.from_pretrained(tiny_model).vocab_size
    with start_dp(tiny_model, 2, *args, "--enable-metrics", log_dir=str(tmp_path), device_args=cpu_args(20000)) as (
        url,
        replicas,
    ):
        outcomes = run(url, LOAD, vocab)
        report = summary(outcomes, LOAD)
        assert report["answered"] == LOAD.agents * LOAD.turns, report["failures"]
        served = defaultdict(set)
        for o in outcomes:
            served[o.agent].add(o.worker)
        assert all(len(w) == 1 and "" not in w for w in served.values()), dict(served)
        by_worker = defaultdict(int)
        for o in outcomes:
            by_worker[o.worker] += 1
        assert set(by_worker) == set(replicas), by_worker  # both replicas serve
        assert {r: requests_served(r) for r in replicas} == by_worker

        chat = requests.post(
            url + "/v1/chat/completions",
            json={"model": "default", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
            timeout=120,
        )
        assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["content"] is not None, chat.text

        # the same load on one replica alone (new conversations: another seed's prompts)
        alone = summary(run(replicas[0], replace(LOAD, seed=LOAD.seed + 1), vocab), LOAD)
        assert alone["answered"] == LOAD.agents * LOAD.turns, alone["failures"]
        assert abs(report["cached_share"] - alone["cached_share"]) <= 0.05, (report, alone)

        flush_cache(url)  # the gateway sends it to every replica
    for i in range(2):
        _, flushes = read_trace(trace.format(replica=i))
        flush = flushes[-1]
        assert flush["kv_available"] == flush["kv_available_at_start"], f"replica {i}: KV slots leaked"
        held = per_request_tables(flush["before"])
        assert held and not any(held.values()), (i, held)


def test_dp_bench_smoke(tmp_path):
    from benchmarks import dp_bench

    out = tmp_path / "dp_bench_smoke.json"
    result = dp_bench.main(["--smoke", "--out", str(out)])
    one, two = result["rows"]
    assert one["replicas"] == 1 and two["replicas"] == 2
    assert one["answered"] == two["answered"] == 4 * 2 and not one["failures"] and not two["failures"]
    assert two["conversations_on_one_replica"] == 4 and sum(two["requests_per_replica"].values()) == 8
    assert json.loads(out.read_text())["commit"]
