"""Soak: a long agent load with cancellations on a real server, and what it leaves behind.

    python -m benchmarks.soak            # SmolLM2-135M on the CPU recipe, 32 agents x 8 turns
    python -m benchmarks.soak --smoke    # tiny random model, a small load: the pipeline (tests)

Two servers, each with eviction on (the default) and off: `--kv dynsplit`, and `--kv dynsplit`
with `--kv-variants` running quest, snapkv, dynamickv and streamingllm beside it (agent a asks for
the a-th policy, in turn). The load (benchmarks/agent_load.py): agents share one system prompt,
each turn adds a private tool output and the model's answer; every k-th request is cancelled, in
turn streamed and dropped by the client, aborted while it decodes, or aborted during a long
chunked prefill. The pool is small for the load, so SGLang retracts requests under pressure.

Reported per server: requests answered / cancelled / failed, the cached share of the shared system
prompt, p50/p99 latency of the answered requests, the most requests running and the peak KV tokens
they held (SGLang's decode-batch log), what compression did (the server's own metrics: KV tokens
decode steps attended and held, as shares of their context), the wall time, how often SGLang
retracted, and the leak
counters after a cache flush: KV slots not back in the allocator and per-request entries left in
the backend's tables (from the `trace_path` flush event). Prints a table and writes
benchmarks/results/soak.json (soak_smoke.json for --smoke) with the machine, commit, date and command.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from benchmarks import agent_load
from benchmarks.agent_load import AgentLoad, summary
from benchmarks.common import cpu_model, output_paths, run_info, save_result
from benchmarks.memory_bench import DecodeLog
from dynsplit_sglang.testing.server import cpu_args, flush_cache, scrape_metrics, start_server

VARIANTS = ("quest", "snapkv", "dynamickv", "streamingllm")
# counters of a flush event that are not per-request state: capacities and running totals
NOT_PER_REQUEST = ("records_capacity", "records_in_use", "records_owned", "evicted_requests", "evicted_tokens")
RETRACTED = "KV cache pool is full. Retract requests."  # SGLang's log line (not its forced test retractions)


def server_args(server: str, budget: int, evict: bool, trace: str) -> list[str]:
    config = {"trace_path": trace, "evict": evict}
    args = ["--kv", "dynsplit", "--kv-budget", str(budget), "--kv-config", json.dumps(config)]
    if server == "variants":
        args += ["--kv-variants", json.dumps({p: {"evict": evict} for p in VARIANTS})]
    return args + ["--decode-log-interval", "1", "--enable-metrics"]


def compression_shares(url: str) -> dict:
    """KV tokens decode steps attended and held, as shares of their context (every policy's)."""
    metrics = scrape_metrics(url)
    tokens = {
        k: sum(metrics.get(f"sglang:kv_compression_{k}_tokens_total", {}).values())
        for k in ("attended", "held", "context")
    }
    context = tokens["context"] or 1
    return {"attended_share": round(tokens["attended"] / context, 3), "held_share": round(tokens["held"] / context, 3)}


def per_request_tables(stats: dict) -> dict:
    """The entries of a flush event's counters (`before`) that are per-request state: every one
    is 0 once the finished requests' state is dropped."""
    return {k: v for k, v in stats.items() if not k.endswith(NOT_PER_REQUEST)}


def unowned_records(stats: dict) -> dict:
    """Per policy: block records in use beyond those the radix tree's slots own (0: none)."""
    return {k: stats[k] - stats[k.replace("in_use", "owned")] for k in stats if k.endswith("records_in_use")}


def leaks(trace: str) -> dict:
    """From the last flush event: KV slots missing from the allocator and per-request table
    entries left behind (both 0 when nothing leaked)."""
    with open(trace) as f:
        event = [e for e in map(json.loads, f) if e["event"] == "flush"][-1]
    before = event["before"]
    return {
        "kv_slots_leaked": event["kv_available_at_start"] - event["kv_available"],
        "table_entries_left": sum(per_request_tables(before).values()),
        "records_unowned": sum(unowned_records(before).values()),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--servers", default="dynsplit,variants", help="dynsplit, variants (several policies)")
    p.add_argument("--evict", default="on,off", help="eviction settings to run, each on every server")
    p.add_argument("--kv-budget", type=int, default=1024)
    p.add_argument("--pool-tokens", type=int, default=32768, help="--max-total-tokens of every server")
    p.add_argument("--agents", type=int, default=32)
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--system", type=int, default=1500, help="shared system prompt tokens")
    p.add_argument("--tool", type=int, default=400, help="private tool output tokens per turn")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens each answered turn decodes")
    p.add_argument("--cancel-every", type=int, default=5, help="every k-th request is cancelled (0: none)")
    p.add_argument("--smoke", action="store_true", help="tiny random model, a small load: the pipeline (tests)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    if args.smoke:
        args.kv_budget, args.pool_tokens, args.agents, args.turns = 128, 6000, 4, 2
        args.system, args.tool, args.new_tokens, args.cancel_every = 300, 100, 4, 3
    model, vocab = cpu_model(args.smoke)
    device_args = cpu_args(args.pool_tokens)
    out, log_dir = output_paths("soak", args.out, args.smoke)
    info = run_info()

    rows = []
    for server in [s.strip() for s in args.servers.split(",") if s.strip()]:
        if server not in ("dynsplit", "variants"):
            raise SystemExit(f"--servers: unknown server {server!r} (dynsplit, variants)")
        policies = ("dynsplit", *VARIANTS) if server == "variants" else ()
        load = AgentLoad(
            args.agents,
            args.turns,
            args.system,
            args.tool,
            args.new_tokens,
            args.cancel_every,
            policies,
            seed=3,
            timeout_s=3600,
        )
        for evict in [e.strip() == "on" for e in args.evict.split(",") if e.strip()]:
            name = f"{server} evict={'on' if evict else 'off'}"
            log = os.path.join(log_dir, name.replace(" ", "_").replace("=", "-") + ".log")
            trace = log.removesuffix(".log") + ".trace.jsonl"
            if os.path.exists(trace):
                os.remove(trace)
            print(f"[{name}] starting the server (log: {log})", flush=True)
            flags = server_args(server, args.kv_budget, evict, trace)
            with start_server(model, *flags, device_args=device_args, timeout=1800, log_path=log) as (url, _):
                decode_log = DecodeLog(log)
                decode_log.mark()
                print(f"[{name}] {load.agents} agents x {load.turns} turns ...", flush=True)
                t0 = time.perf_counter()
                report = summary(agent_load.run(url, load, vocab), load)
                wall = time.perf_counter() - t0
                running, kv_tokens = decode_log.peaks()
                shares = compression_shares(url)
                flush_cache(url)
            with open(log, errors="replace") as f:
                retractions = f.read().count(RETRACTED)
            row = {
                "server": server,
                "evict": evict,
                **{k: v for k, v in report.items() if k != "failures"},
                "max_running": running,
                "peak_kv_tokens": kv_tokens,
                **shares,
                "retractions": retractions,
                "wall_s": round(wall, 1),
                **leaks(trace),
                "failures": report["failures"][:10],
            }
            rows.append(row)
            print(f"[{name}]   {row}", flush=True)

    result = {**info, "model": os.path.basename(model), "budget": args.kv_budget, "args": vars(args), "rows": rows}
    save_result(out, result, markdown(result))
    return result


def markdown(result: dict) -> str:
    head = (
        "| server | evict | answered | cancelled | failed | system prompt cached | p50 s | p99 s "
        "| most running | peak KV tokens | attended / context | held / context | retractions | wall s "
        "| KV slots leaked | table entries left |"
    )
    lines = [head, "| " + " | ".join(["---"] * 16) + " |"]
    for r in result["rows"]:
        lines.append(
            f"| {r['server']} | {'on' if r['evict'] else 'off'} | {r['answered']} | {r['cancelled']} | {r['failed']} "
            f"| {r['system_prompt_cached_share']} | {r['latency_p50_s']} | {r['latency_p99_s']} | {r['max_running']} "
            f"| {r['peak_kv_tokens']} | {r['attended_share']} | {r['held_share']} | {r['retractions']} "
            f"| {r['wall_s']} | {r['kv_slots_leaked']} "
            f"| {r['table_entries_left'] + r['records_unowned']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
