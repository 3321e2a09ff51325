"""Generating the suite's answers through SGLang (`sgl.Engine`, the code path of the server).

One engine per policy, radix cache on. For each prompt, the first budget is sent alone (it pays
the prefill) and the other budgets follow as one batch that hits the radix cache, each with its
own KV budget in `custom_params={"kv_budget": B}`; the engine itself starts with the largest
budget of the run. `engine_per_budget` instead starts one engine per distinct budget (the way
to compare against, and the fallback for a core without the per-request override).

Every answer is appended to a .partial.jsonl as soon as it exists, so an interrupted run
resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

from benchmarks.accuracy.policies import Policy, engine_args
from benchmarks.accuracy.scoring import score
from benchmarks.accuracy.tasks import Sample, render


@dataclass(frozen=True)
class Settings:
    """What every policy of a run shares.

    model:             model folder.
    budgets:           KV budgets: a value <= 1 is a fraction of the length setting, a value > 1
                       a number of tokens.
    device:            "cpu" (fp32) or "cuda" (bf16).
    engine_per_budget: one engine per distinct budget instead of per-request budgets.
    """

    model: str
    budgets: tuple[float, ...]
    device: str
    engine_per_budget: bool = False


def budget_tokens(setting: float, length: int) -> int:
    """KV tokens of a budget setting at a length setting."""
    return int(setting * length) if setting <= 1 else int(setting)


def record_key(policy: str, config: dict, task: str, length: int, seed: int, setting) -> str:
    return json.dumps([policy, config, task, length, seed, setting], sort_keys=True)


def load_partial(path: str, model: str) -> dict[str, dict]:
    """Records of an interrupted run with this model, by `record_key`."""
    done = {}
    if os.path.exists(path):
        with open(path) as fh:
            for line in fh:
                r = json.loads(line)
                if r["model"] == model:
                    done[record_key(r["policy"], r["config"], r["task"], r["length"], r["seed"], r["budget_setting"])] = r
    return done


def pending(policy: Policy, samples: list[Sample], settings: Settings, done: dict) -> list[tuple[Sample, list]]:
    """(sample, [budget setting, ...]) still to generate for this policy; `full` has the one
    setting None."""
    out = []
    for s in samples:
        todo = [b for b in ([None] if policy.dense else settings.budgets)
                if record_key(policy.label, policy.config, s.task, s.length, s.seed, b) not in done]
        if todo:
            out.append((s, todo))
    return out


def run_policy(policy: Policy, work: list[tuple[Sample, list]], settings: Settings, tokenizer, max_total_tokens: int,
               on_record) -> None:
    """Generate, score and hand each record to `on_record` as soon as it exists."""
    import sglang as sgl

    if policy.dense or not settings.engine_per_budget:
        largest = max(budget_tokens(b, s.length) for s, bs in work for b in bs if b is not None) if not policy.dense else None
        engines = [(largest, work)]
    else:
        by_budget: dict[int, list] = {}
        for s, bs in work:
            for b in bs:
                by_budget.setdefault(budget_tokens(b, s.length), []).append((s, [b]))
        engines = sorted(by_budget.items(), reverse=True)
    per_request = not policy.dense and not settings.engine_per_budget
    for engine_budget, items in engines:
        eng = sgl.Engine(**engine_args(policy, settings.model, engine_budget, max_total_tokens, settings.device))
        try:
            for sample, bs in items:
                for record in generate(eng, policy, sample, bs, tokenizer, os.path.basename(settings.model), per_request):
                    on_record(record)
        finally:
            eng.shutdown()


def generate(eng, policy: Policy, sample: Sample, settings: list, tokenizer, model: str, per_request: bool) -> list[dict]:
    """Greedy answers of one prompt at each budget setting: the first request prefills, the rest
    reuse that prefill from the radix cache in one batch. A record's `seconds` is the wall time of
    the call that produced it (shared by a batch); `cached_tokens` the prompt tokens it found in
    the radix cache."""
    ids = tokenizer(render(tokenizer, sample.messages), add_special_tokens=False).input_ids

    def params(setting):
        p = {"temperature": 0, "max_new_tokens": sample.max_new_tokens}
        if per_request and setting is not None:
            p["custom_params"] = {"kv_budget": budget_tokens(setting, sample.length)}
        return p

    outputs = []
    for batch in ([settings[0]], settings[1:]) if len(settings) > 1 else ([settings[0]],):
        start = time.perf_counter()
        outs = eng.generate(input_ids=[ids] * len(batch), sampling_params=[params(b) for b in batch])
        seconds = round(time.perf_counter() - start, 3)
        outputs += [(b, o, seconds) for b, o in zip(batch, outs)]
    records = []
    for setting, out, seconds in outputs:
        budget = sample.length if setting is None else budget_tokens(setting, sample.length)
        records.append({
            "policy": policy.label, "kv": policy.kv, "config": policy.config, "model": model,
            "task": sample.task, "family": sample.family, "scenario": sample.scenario,
            "length": sample.length, "seed": sample.seed, "budget_setting": setting, "budget": budget,
            "fraction": round(budget / sample.length, 6), "prompt_tokens": len(ids),
            "cached_tokens": out["meta_info"].get("cached_tokens"), "seconds": seconds,
            "answers": list(sample.answers), "output": out["text"], "score": score(sample, out["text"]),
        })
    return records
