"""KV memory with eviction: how many requests one KV pool runs at once, eviction on against off.

    python -m benchmarks.memory_bench            # SmolLM2-135M on the CPU recipe (fp32), a 32,768-token pool
    python -m benchmarks.memory_bench --smoke    # tiny random model, short prompts: the pipeline (tests)

Each configuration gets its own server (`python -m sglang.launch_server --kv POLICY --kv-budget B`,
radix cache on, `--decode-log-interval 1`), `--kv full` first. Two loads, greedy, `ignore_eos`:

- distinct: N requests of P random-token prompt tokens (nothing shared), sent at once, each
  decoding T tokens. Reported: the most requests decoding at once and the peak KV tokens held
  by running requests (SGLang's own decode-batch log: `#running-req`, `#token`, which leaves
  out the radix cache's evictable tokens), the decode throughput (completion tokens after each
  request's first, over the time decode steps ran: the gaps between consecutive decode steps
  in which no request got its first token, so prefills stay out), and the whole load's wall time.
- agent: A agents, each a conversation of K turns over one shared system prompt of S tokens; a
  turn adds a private tool output of O tokens and the model's answer (T tokens) to the next
  turn's prompt. The agents run concurrently, their turns in order. Reported: the share of
  prompt tokens served from the radix cache (SGLang's `cached_tokens`) and the share of the
  system prompt among them, peak KV in use, wall time.

Eviction is switched with the policy's `evict` option (`--kv-config '{"evict": false}'`); the
decode-time policies (dynsplit, quest) keep their default `resident` set (2 x the budget). Prints a table and writes
benchmarks/results/memory_bench.json (memory_bench_smoke.json for --smoke) with the machine,
commit, date and command.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass

from benchmarks import agent_load
from benchmarks.agent_load import AgentLoad, summary
from benchmarks.common import cpu_model, output_paths, ratio_text, run_info, save_result
from benchmarks.serve_bench import Stream, stream_request
from dynsplit_sglang.policies import POLICY_CLASSES
from dynsplit_sglang.testing.server import cpu_args, flush_cache, start_server

DECODE_LINE = re.compile(r"Decode batch.*?#running-req: (\d+), #token: (\d+)")
STEP_GAP_S = 0.010  # token chunks closer than this belong to one decode step


@dataclass(frozen=True)
class Config:
    policy: str
    evict: bool | None  # None: --kv full

    @property
    def name(self) -> str:
        return self.policy + ("" if self.evict is None else f" evict={'on' if self.evict else 'off'}")

    def server_args(self, budget: int) -> list[str]:
        if self.policy == "full":
            return ["--kv", "full", "--attention-backend", "torch_native"]
        args = ["--kv", self.policy, "--kv-budget", str(budget)]
        return args + ([] if self.evict is None else ["--kv-config", json.dumps({"evict": self.evict})])


def configs(policies: list[str]) -> list[Config]:
    out = []
    for p in policies:
        if p == "full":
            out.append(Config(p, None))
        elif p not in POLICY_CLASSES:
            raise SystemExit(f"--kv: unknown policy {p!r} (full, {', '.join(POLICY_CLASSES)})")
        else:
            out += [Config(p, False), Config(p, True)]
    return out


def decode_rate(streams: list[Stream]) -> tuple[float, int]:
    """(seconds, tokens) of decoding: the gaps between consecutive decode steps (token chunks
    after each request's first, grouped by arrival) with no first token inside, and the tokens
    the later step of each such gap brought."""
    firsts = sorted(s.times[0] for s in streams if s.times)
    chunks = sorted((t, n - prev) for s in streams for t, n, prev in zip(s.times[1:], s.tokens[1:], s.tokens))
    steps: list[list[float]] = []  # [time of the step's last chunk, tokens]
    for t, n in chunks:
        if steps and t - steps[-1][0] < STEP_GAP_S:
            steps[-1][0], steps[-1][1] = t, steps[-1][1] + n
        else:
            steps.append([t, n])
    seconds, tokens = 0.0, 0
    for (t0, _), (t1, n) in zip(steps, steps[1:]):
        if not any(t0 < f <= t1 for f in firsts):
            seconds, tokens = seconds + t1 - t0, tokens + n
    return seconds, tokens


class DecodeLog:
    """Follows a server log for SGLang's decode-batch lines: the most running requests and the
    most KV tokens they held."""

    def __init__(self, path: str):
        self.path, self.offset = path, 0

    def mark(self) -> None:
        with open(self.path, errors="replace") as f:
            f.seek(0, os.SEEK_END)
            self.offset = f.tell()

    def peaks(self) -> tuple[int, int]:
        with open(self.path, errors="replace") as f:
            f.seek(self.offset)
            found = [(int(a), int(b)) for a, b in DECODE_LINE.findall(f.read())]
        return max((a for a, _ in found), default=0), max((b for _, b in found), default=0)


def run_distinct(url: str, n: int, prompt: int, new: int, vocab: int, seed: int) -> dict:
    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab) for _ in range(prompt)] for _ in range(n)]
    streams = [Stream() for _ in prompts]
    threads = [threading.Thread(target=stream_request, args=(url, p, new, s)) for p, s in zip(prompts, streams)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    failed = [s.error or "no tokens came back" for s in streams if s.error or not s.times]
    if failed:
        raise RuntimeError(f"distinct load: {len(failed)} request(s) failed: {failed[0]}")
    seconds, tokens = decode_rate(streams)
    return {
        "wall_s": round(time.perf_counter() - t0, 2),
        "decode_s": round(seconds, 2),
        "decode_tokens_per_s": round(tokens / seconds, 2) if seconds else None,
    }


def generate(url: str, ids: list[int], new: int) -> dict:
    body = {"input_ids": ids, "sampling_params": {"temperature": 0, "max_new_tokens": new, "ignore_eos": True}}
    request = urllib.request.Request(
        url + "/generate", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=3600) as r:
        return json.load(r)


def run_agents(url: str, load: AgentLoad, vocab: int) -> dict:
    t0 = time.perf_counter()
    report = summary(agent_load.run(url, load, vocab), load)
    if report["failed"]:
        raise RuntimeError(f"agent load: {report['failures'][0]}")
    keep = ("requests", "cached_share", "system_prompt_cached_share", "prefilled_tokens")
    return {"wall_s": round(time.perf_counter() - t0, 2), **{k: report[k] for k in keep}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kv", default="full,snapkv,dynamickv,dynsplit,quest", help="policies, in this order")
    p.add_argument("--kv-budget", type=int, default=1024)
    p.add_argument("--pool-tokens", type=int, default=32768, help="--max-total-tokens of every server")
    p.add_argument("--requests", type=int, default=16, help="distinct load: requests sent at once")
    p.add_argument("--prompt", type=int, default=7000, help="distinct load: prompt tokens per request")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens each request of the distinct load decodes")
    p.add_argument("--agents", type=int, default=8)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--system", type=int, default=1500, help="agent load: shared system prompt tokens")
    p.add_argument("--tool", type=int, default=500, help="agent load: private tool output tokens per turn")
    p.add_argument("--answer", type=int, default=32, help="agent load: tokens each turn decodes")
    p.add_argument("--loads", default="distinct,agent")
    p.add_argument("--smoke", action="store_true", help="tiny random model, short prompts: the pipeline (tests)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    if args.smoke:
        args.kv_budget, args.pool_tokens, args.requests, args.prompt, args.new_tokens = 128, 4096, 6, 900, 8
        args.agents, args.turns, args.system, args.tool, args.answer = 3, 2, 300, 100, 4
    model, vocab = cpu_model(args.smoke)
    device_args = cpu_args(args.pool_tokens)
    loads = [x.strip() for x in args.loads.split(",") if x.strip()]
    out, log_dir = output_paths("memory_bench", args.out, args.smoke)
    info = run_info()

    rows = []
    for config in configs([x.strip() for x in args.kv.split(",") if x.strip()]):
        log = os.path.join(log_dir, config.name.replace(" ", "_").replace("=", "-") + ".log")
        print(f"[{config.name}] starting the server (log: {log})", flush=True)
        flags = config.server_args(args.kv_budget) + ["--decode-log-interval", "1"]
        with start_server(model, *flags, device_args=device_args, timeout=1800, log_path=log) as (url, _):
            generate(url, list(range(100, 100 + min(args.prompt, 1024))), 4)  # warm-up: lazy initialisation
            flush_cache(url)
            decode_log = DecodeLog(log)
            for load in loads:
                print(f"[{config.name}] {load} load ...", flush=True)
                decode_log.mark()
                if load == "distinct":
                    measured = run_distinct(url, args.requests, args.prompt, args.new_tokens, vocab, seed=1)
                elif load == "agent":
                    agents = AgentLoad(args.agents, args.turns, args.system, args.tool, args.answer, seed=2)
                    measured = run_agents(url, agents, vocab)
                else:
                    raise SystemExit(f"--loads: unknown load {load!r} (distinct, agent)")
                running, kv_tokens = decode_log.peaks()
                row = {"policy": config.policy, "evict": config.evict, "load": load, **measured}
                row.update(max_running=running, peak_kv_tokens=kv_tokens)
                rows.append(row)
                print(f"[{config.name}]   {row}", flush=True)
                flush_cache(url)

    result = {
        **info,
        "model": os.path.basename(model),
        "budget": args.kv_budget,
        "pool_tokens": args.pool_tokens,
        "args": vars(args),
        "rows": rows,
    }
    save_result(out, result, markdown(result))
    return result


def markdown(result: dict) -> str:
    """The README tables: the distinct load (against full) and the agent load."""
    rows = result["rows"]
    full = {r["load"]: r for r in rows if r["policy"] == "full"}

    def name(r):
        return r["policy"] + ("" if r["evict"] is None else f", evict {'on' if r['evict'] else 'off'}")

    lines = []
    distinct = [r for r in rows if r["load"] == "distinct"]
    if distinct:
        lines += [
            "| policy | most running | peak KV tokens | decode tok/s | vs full | wall s |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
    for r in distinct:
        ref = full.get("distinct")
        ratio = (
            "" if not ref or r["policy"] == "full" else ratio_text(r["decode_tokens_per_s"], ref["decode_tokens_per_s"])
        )
        lines.append(
            f"| {name(r)} | {r['max_running']} | {r['peak_kv_tokens']} | {r['decode_tokens_per_s']} | {ratio} "
            f"| {r['wall_s']} |"
        )
    agent = [r for r in rows if r["load"] == "agent"]
    if agent:
        lines += [
            *([""] if lines else []),
            "| policy | cached share of prompts | of the system prompt | tokens prefilled | peak KV tokens | wall s |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in agent:
            lines.append(
                f"| {name(r)} | {r['cached_share']} | {r['system_prompt_cached_share']} | {r['prefilled_tokens']} "
                f"| {r['peak_kv_tokens']} | {r['wall_s']} |"
            )
    return "\n".join(lines) + f"\n\n{result['device']}, {result['date']}, commit {result['commit']}"


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
