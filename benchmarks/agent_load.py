"""A multi-turn agent load on a running server, with the cancellations real clients make.

Agents share a system prompt (the tool list of an agent framework; one, or one per kind of agent:
`systems`); each turn appends a private tool output to the agent's history, asks for an answer
and appends it. Some requests are
cancelled, in turn: streamed and dropped by the client after a few chunks (SGLang aborts them
when it sees the disconnect), aborted with `/abort_request` while they decode, or aborted while
a long chunked prefill runs. An agent whose turn was cancelled goes on with its next tool output.

Used by benchmarks/soak.py (the long run), benchmarks/memory_bench.py (the agent row),
benchmarks/dp_bench.py (replicas behind the gateway), tests/test_soak.py and tests/test_gateway.py.
"""

from __future__ import annotations

import json
import random
import statistics
import threading
import time
from dataclasses import dataclass, field

import requests

ANSWER, DROP, ABORT_DECODE, ABORT_PREFILL = "answer", "drop", "abort_decode", "abort_prefill"
CANCELLATIONS = (DROP, ABORT_DECODE, ABORT_PREFILL)
CANCEL_NEW_TOKENS = 400  # a cancelled request asks for more than it gets to decode
PREFILL_EXTRA = 6  # an abort_prefill request's private part, in tool outputs (a long chunked prefill)


@dataclass(frozen=True)
class AgentLoad:
    """What to send. cancel_every k: every k-th request (counted over agents and turns) is
    cancelled, the kinds of CANCELLATIONS in turn; 0: none. policies: the kv_policy labels of a
    `--kv-variants` server, agent a asking for policies[a % len(policies)]; empty: the server's
    --kv policy. systems: how many system prompts (agent kinds) there are, agent a using the
    (a % systems)-th."""

    agents: int = 8
    turns: int = 3
    system_tokens: int = 1500
    tool_tokens: int = 400
    new_tokens: int = 16
    cancel_every: int = 0
    policies: tuple[str, ...] = ()
    seed: int = 0
    timeout_s: float = 600
    systems: int = 1

    def kind(self, agent: int, turn: int) -> str:
        k = agent * self.turns + turn
        if not self.cancel_every or k % self.cancel_every != self.cancel_every - 1:
            return ANSWER
        return CANCELLATIONS[(k // self.cancel_every) % len(CANCELLATIONS)]


@dataclass
class Outcome:
    """One request: `status` is answered (all its new tokens), cancelled (as the load meant) or
    failed (anything else: an error, a missing answer, a cancellation that did not happen)."""

    agent: int
    turn: int
    kind: str
    status: str = "failed"
    detail: str = ""
    prompt_tokens: int = 0
    cached_tokens: int = 0
    latency_s: float = 0.0
    output_ids: list[int] = field(default_factory=list)
    worker: str = ""  # the replica a gateway routed it to (its x-smg-routed-worker-id header)


def run(url: str, load: AgentLoad, vocab: int) -> list[Outcome]:
    """Send the whole load (one thread per agent) and return every request's outcome."""
    rng = random.Random(load.seed)
    draw = lambda n: [rng.randrange(100, vocab - 100) for _ in range(n)]  # noqa: E731 (no special tokens)
    shared = [draw(load.system_tokens) for _ in range(load.systems)]
    tools = [[draw(load.tool_tokens) for _ in range(load.turns)] for _ in range(load.agents)]
    extra = [draw(load.tool_tokens * PREFILL_EXTRA) for _ in range(load.agents)]
    outcomes: list[Outcome] = []
    lock = threading.Lock()

    def agent(a: int) -> None:
        history = list(shared[a % load.systems])
        for t in range(load.turns):
            history += tools[a][t]
            kind = load.kind(a, t)
            prompt = history + extra[a] if kind == ABORT_PREFILL else history
            policy = load.policies[a % len(load.policies)] if load.policies else None
            out = Outcome(a, t, kind, prompt_tokens=len(prompt))
            start = time.perf_counter()
            try:
                # fixed width: SGLang aborts every request whose rid starts with the one named
                _send(url, load, prompt, policy, out, rid=f"agent-{load.seed}-{a:04d}-{t:04d}")
            except (requests.RequestException, ValueError, KeyError) as e:
                out.status, out.detail = "failed", f"{type(e).__name__}: {e}"
            out.latency_s = time.perf_counter() - start
            with lock:
                outcomes.append(out)
            if out.status == "answered":
                history += out.output_ids

    threads = [threading.Thread(target=agent, args=(a,)) for a in range(load.agents)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sorted(outcomes, key=lambda o: (o.agent, o.turn))


def _send(url: str, load: AgentLoad, prompt: list[int], policy: str | None, out: Outcome, rid: str) -> None:
    params = {"temperature": 0, "max_new_tokens": load.new_tokens, "ignore_eos": True}
    if policy is not None:
        params["custom_params"] = {"kv_policy": policy}
    if out.kind != ANSWER:
        params["max_new_tokens"] = CANCEL_NEW_TOKENS
    body = {"input_ids": prompt, "sampling_params": params, "rid": rid}
    if out.kind == ANSWER:
        reply = requests.post(url + "/generate", json=body, timeout=load.timeout_s)
        reply.raise_for_status()
        out.worker = reply.headers.get("x-smg-routed-worker-id", "")
        result = reply.json()
        meta = result["meta_info"]
        out.cached_tokens = int(meta.get("cached_tokens", 0))
        out.output_ids = result["output_ids"]
        finish = (meta.get("finish_reason") or {}).get("type")
        if finish == "length" and len(out.output_ids) == load.new_tokens:
            out.status = "answered"
        else:
            out.detail = f"finish {finish!r} with {len(out.output_ids)} of {load.new_tokens} tokens"
    elif out.kind == ABORT_PREFILL:
        timer = threading.Timer(0.3, abort, args=(url, rid))
        timer.start()
        try:
            reply = requests.post(url + "/generate", json=body, timeout=load.timeout_s)
        finally:
            timer.cancel()
        _expect_abort(out, reply.json()["meta_info"])
    else:
        chunks = 0
        with requests.post(url + "/generate", json={**body, "stream": True}, stream=True, timeout=load.timeout_s) as r:
            r.raise_for_status()
            last = None
            for line in r.iter_lines():
                if not line.startswith(b"data: {"):
                    continue
                last = json.loads(line[len(b"data: ") :])
                chunks += 1
                if chunks == 3:
                    if out.kind == DROP:
                        break  # the client goes away: closing the response drops the connection
                    abort(url, rid)
        if out.kind == DROP:
            out.status, out.detail = "cancelled", "dropped by the client"
        else:
            _expect_abort(out, last["meta_info"] if last else {})


def _expect_abort(out: Outcome, meta: dict) -> None:
    finish = (meta.get("finish_reason") or {}).get("type")
    out.cached_tokens = int(meta.get("cached_tokens", 0))
    if finish == "abort":
        out.status, out.detail = "cancelled", "aborted"
    else:
        out.detail = f"not aborted: finish {finish!r}"


def abort(url: str, rid: str) -> None:
    requests.post(url + "/abort_request", json={"rid": rid}, timeout=60).raise_for_status()


def summary(outcomes: list[Outcome], load: AgentLoad) -> dict:
    """Requests answered / cancelled / failed; of the answered ones, the cached share of their
    prompts and of the shared system prompt, the tokens they prefilled and latency percentiles."""
    answered = [o for o in outcomes if o.status == "answered"]
    latencies = sorted(o.latency_s for o in answered)
    prompt_tokens = sum(o.prompt_tokens for o in answered)

    def pct(q: float) -> float | None:
        return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))], 3) if latencies else None

    return {
        "requests": len(outcomes),
        "answered": len(answered),
        "cancelled": sum(o.status == "cancelled" for o in outcomes),
        "failed": sum(o.status == "failed" for o in outcomes),
        "cached_share": round(sum(o.cached_tokens for o in answered) / prompt_tokens, 3) if answered else None,
        "system_prompt_cached_share": (
            round(
                sum(min(o.cached_tokens, load.system_tokens) for o in answered) / (load.system_tokens * len(answered)),
                3,
            )
            if answered
            else None
        ),
        "prefilled_tokens": sum(o.prompt_tokens - o.cached_tokens for o in answered),
        "latency_p50_s": pct(0.5),
        "latency_p99_s": pct(0.99),
        "latency_mean_s": round(statistics.fmean(latencies), 3) if latencies else None,
        "failures": [f"agent {o.agent} turn {o.turn} ({o.kind}): {o.detail}" for o in outcomes if o.status == "failed"],
    }
