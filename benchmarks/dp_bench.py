"""One server against replicas behind SGLang's gateway, on the same agent load.

    python -m benchmarks.dp_bench                # SmolLM2-135M, CPU: 1 server vs 2 replicas
    python -m benchmarks.dp_bench --smoke        # tiny random model, a small load (tests)

The agent load (benchmarks/agent_load.py, no cancellations: the gateway does not route
/abort_request): conversations of several turns, each kind of agent with its own system prompt.
Each setting runs on fresh servers: `--kv dynsplit` alone on every core, then
`python -m dynsplit_sglang.serve_dp --replicas N` (the cores split between the replicas, smg's
cache-aware routing in front). Reported: requests answered, wall time, generated tokens per
second, the cached share of the prompts and of the system prompts, p50/p99 latency, how the
gateway spread the requests and whether each conversation stayed on one replica. On a 2-core
machine the replicas split the same two cores, so the point is routing and cache reuse, not
speed. Prints a table and writes benchmarks/results/dp_bench.json (dp_bench_smoke.json).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import Counter, defaultdict

from benchmarks import agent_load
from benchmarks.agent_load import AgentLoad, summary
from benchmarks.common import cpu_model, output_paths, run_info, save_result
from dynsplit_sglang.testing.server import cpu_args, start_dp, start_server


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--kv-budget", type=int, default=1024)
    p.add_argument("--pool-tokens", type=int, default=32768, help="--max-total-tokens of every server")
    p.add_argument("--agents", type=int, default=16)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--systems", type=int, default=4, help="kinds of agent, each with its own system prompt")
    p.add_argument("--system", type=int, default=1500, help="system prompt tokens")
    p.add_argument("--tool", type=int, default=400, help="tool output tokens per turn")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--smoke", action="store_true", help="tiny random model, a small load")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.smoke:
        args.kv_budget, args.pool_tokens, args.agents, args.turns = 128, 8000, 4, 2
        args.systems, args.system, args.tool, args.new_tokens = 2, 200, 64, 4

    model, vocab = cpu_model(args.smoke)
    out, log_dir = output_paths("dp_bench", args.out, args.smoke)
    load = AgentLoad(
        args.agents, args.turns, args.system, args.tool, args.new_tokens, systems=args.systems, seed=11, timeout_s=3600
    )
    flags = ("--kv", "dynsplit", "--kv-budget", str(args.kv_budget))
    info = run_info()
    rows = []
    for replicas in (1, args.replicas):
        name = "1 server" if replicas == 1 else f"{replicas} replicas + gateway"
        print(f"[{name}] starting ...", flush=True)
        if replicas == 1:
            log = os.path.join(log_dir, "server.log")
            servers = start_server(model, *flags, device_args=cpu_args(args.pool_tokens), timeout=1800, log_path=log)
        else:
            servers = start_dp(
                model, replicas, *flags, log_dir=log_dir, device_args=cpu_args(args.pool_tokens), timeout=1800
            )
        with servers as (url, _):
            print(f"[{name}] {load.agents} agents x {load.turns} turns ...", flush=True)
            t0 = time.perf_counter()
            outcomes = agent_load.run(url, load, vocab)
            wall = time.perf_counter() - t0
        report = summary(outcomes, load)
        workers = defaultdict(set)
        for o in outcomes:
            workers[o.agent].add(o.worker)
        row = {
            "setting": name,
            "replicas": replicas,
            **{k: v for k, v in report.items() if k != "failures"},
            "wall_s": round(wall, 1),
            "generated_tokens_per_s": round(report["answered"] * load.new_tokens / wall, 2),
            "requests_per_replica": dict(Counter(o.worker for o in outcomes)) if replicas > 1 else None,
            "conversations_on_one_replica": sum(len(w) == 1 for w in workers.values()) if replicas > 1 else None,
            "failures": report["failures"][:10],
        }
        rows.append(row)
        print(f"[{name}]   {json.dumps(row)}", flush=True)
    result = {**info, "model": os.path.basename(model), "budget": args.kv_budget, "args": vars(args), "rows": rows}
    save_result(out, result, markdown(result))
    return result


def markdown(result: dict) -> str:
    lines = [
        "| setting | answered | wall s | generated tok/s | cached share | system prompt cached | p50 s | p99 s "
        "| requests per replica | conversations on one replica |",
        "| " + " | ".join(["---"] * 10) + " |",
    ]
    for r in result["rows"]:
        spread = " / ".join(str(n) for n in (r["requests_per_replica"] or {}).values()) or ""
        on_one = r["conversations_on_one_replica"]
        on_one = "" if on_one is None else f"{on_one} of {result['args']['agents']}"
        lines.append(
            f"| {r['setting']} | {r['answered']} | {r['wall_s']} | {r['generated_tokens_per_s']} | {r['cached_share']} "
            f"| {r['system_prompt_cached_share']} | {r['latency_p50_s']} | {r['latency_p99_s']} | {spread} | {on_one} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
