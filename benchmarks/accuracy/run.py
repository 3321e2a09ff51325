"""Generating the suite's answers through SGLang (`sgl.Engine`, the code path of the server).

Engines (`Settings.engines`):

    shared  one engine runs every compressing policy of the run (the first as --kv, the others as
            --kv-variants); each request names its policy and budget in custom_params, and `full`
            is a request whose budget covers the whole sequence (the dense path, which gives
            exactly `--kv full`'s tokens). Per prompt, the first request pays the prefill and all
            other (policy, budget) requests follow as one batch that hits the radix cache.
    policy  one engine per policy (radix cache on), budgets per request; `full` runs SGLang's own
            torch_native attention.
    budget  one engine per policy and budget: nothing per request (the way to compare against).

Every answer is appended to a .partial.jsonl as soon as it exists, so an interrupted run
resumes where it stopped. A finished run is one gzipped JSON file (`accuracy.json.gz`: a full run
is 19 MB of JSON, 1 MB gzipped); runs saved before that as plain `.json` are read as well.
"""

from __future__ import annotations

import gzip
import json
import os
import sys
import time
from dataclasses import dataclass

from benchmarks.accuracy.policies import Policy, engine_args, policy_engine_kwargs, shared_engine
from benchmarks.accuracy.scoring import score
from benchmarks.accuracy.tasks import Sample, render

ENGINES = ("shared", "policy", "budget")


@dataclass(frozen=True)
class Settings:
    """What every policy of a run shares.

    model:   model folder.
    budgets: KV budgets: a value <= 1 is a fraction of the length setting, a value > 1 a number
             of tokens.
    device:  "cpu" (fp32) or "cuda" (bf16).
    engines: "shared", "policy" or "budget" (see the module docstring).
    """

    model: str
    budgets: tuple[float, ...]
    device: str
    engines: str = "shared"


def budget_tokens(setting: float, length: int) -> int:
    """KV tokens of a budget setting at a length setting."""
    return int(setting * length) if setting <= 1 else int(setting)


def record_key(policy: str, config: dict, task: str, length: int, seed: int, setting) -> str:
    return json.dumps([policy, config, task, length, seed, setting], sort_keys=True)


def load_partial(path: str, model: str) -> dict[str, dict]:
    """Records of an interrupted run with this model, by `record_key`. A last line without its
    newline is a record whose write was cut off (the process was killed): it is cut from the file,
    so that the run appends after whole lines, and generated again."""
    size, whole = _whole_lines(path)
    if len(whole) < size:
        # stderr, not logging: SGLang's logging setup disables loggers that exist before it runs
        print(f"{path}: dropping an unfinished last record ({size - len(whole)} bytes)", file=sys.stderr)
        with open(path, "r+b") as fh:
            fh.truncate(len(whole))
    return {
        record_key(r["policy"], r["config"], r["task"], r["length"], r["seed"], r["budget_setting"]): r
        for r in _parse_records(path, whole)
        if r["model"] == model
    }


def saved_records(path: str) -> list[dict]:
    """Every whole record of a progress file, read only (the run may be appending to it: a last
    line without its newline is left out); [] if there is none."""
    return _parse_records(path, _whole_lines(path)[1])


def run_base(out: str) -> str:
    """A run's path without its extension: `X`, `X.json` and `X.json.gz` all name run X, whose
    files are X.json.gz (the result), X.partial.jsonl (answers so far) and X*.png (plots)."""
    return out.removesuffix(".gz").removesuffix(".json")


def result_path(out: str) -> str:
    """Where run `out` writes its result: always the gzipped form."""
    return run_base(out) + ".json.gz"


def find_result(out: str) -> str | None:
    """The saved result of run `out`: X.json.gz, else the plain X.json of an older run; None if neither."""
    base = run_base(out)
    return next((p for p in (base + ".json.gz", base + ".json") if os.path.exists(p)), None)


def load_result(path: str) -> dict:
    """A result file, gzipped (`.gz`) or plain JSON."""
    with gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8") as fh:
        return json.load(fh)


def write_result(result: dict, out: str) -> str:
    """Write `result` gzipped to `result_path(out)` and return that path. The JSON text is what the
    plain files held (indent 1); mtime 0 in the gzip header, so the same result gives the same bytes."""
    path = result_path(out)
    data = gzip.compress(json.dumps(result, indent=1).encode("utf-8"), compresslevel=9, mtime=0)
    with open(path + ".tmp", "wb") as fh:
        fh.write(data)
    os.replace(path + ".tmp", path)  # a reader never sees half a file
    return path


def _whole_lines(path: str) -> tuple[int, bytes]:
    """(size of the file, its bytes up to and with the last newline); (0, b"") if there is no file."""
    if not os.path.exists(path):
        return 0, b""
    with open(path, "rb") as fh:
        data = fh.read()
    return len(data), data[: data.rfind(b"\n") + 1]


def _parse_records(path: str, whole: bytes) -> list[dict]:
    records = []
    for number, line in enumerate(whole.splitlines(), 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {number}: not a JSON record ({e})") from None
    return records


Item = tuple[Policy, float | None]  # (policy, budget setting; None for full)


def pending(
    policies: list[Policy], samples: list[Sample], settings: Settings, done: dict
) -> list[tuple[Sample, list[Item]]]:
    """(sample, [(policy, budget setting), ...]) still to generate; `full` has the one setting None."""
    out = []
    for s in samples:
        todo = [
            (p, b)
            for p in policies
            for b in ([None] if p.dense else settings.budgets)
            if record_key(p.label, p.config, s.task, s.length, s.seed, b) not in done
        ]
        if todo:
            out.append((s, todo))
    return out


def engine_groups(policies: list[Policy], work: list[tuple[Sample, list[Item]]], settings: Settings):
    """[(engine kwargs except model/memory, server label of each policy, work)] in run order."""
    sparse = [p for p in policies if not p.dense]
    if settings.engines == "shared" and sparse:
        budget = max(s.length for s, _ in work)  # every request names its own; this one is valid for all
        kwargs, labels = shared_engine(sparse, budget)
        return [(kwargs, labels, work)]
    groups = []
    for p in policies:
        mine = [(s, [(q, b) for q, b in items if q is p]) for s, items in work]
        mine = [(s, items) for s, items in mine if items]
        if not mine:
            continue
        if p.dense or settings.engines == "policy":
            budget = None if p.dense else max(budget_tokens(b, s.length) for s, items in mine for _, b in items)
            groups.append((policy_engine_kwargs(p, budget), {}, mine))
        else:
            by_budget: dict[int, list] = {}
            for s, items in mine:
                for item in items:
                    by_budget.setdefault(budget_tokens(item[1], s.length), []).append((s, [item]))
            groups += [(policy_engine_kwargs(p, b), {}, w) for b, w in sorted(by_budget.items(), reverse=True)]
    return groups


def run(
    policies: list[Policy], work, settings: Settings, tokenizer, max_total_tokens: int, on_record, on_engine=None
) -> None:
    """Generate, score and hand each record to `on_record` as soon as it exists."""
    import sglang as sgl

    model = os.path.basename(settings.model)
    for kwargs, labels, items in engine_groups(policies, work, settings):
        if on_engine:
            on_engine(kwargs)
        eng = sgl.Engine(**engine_args(kwargs, settings.model, max_total_tokens, settings.device))
        try:
            for sample, todo in items:
                for record in generate(eng, sample, todo, labels, settings.engines, tokenizer, model):
                    on_record(record)
        finally:
            eng.shutdown()


def request_params(sample: Sample, policy: Policy, setting, labels: dict, engines: str) -> dict:
    """Greedy sampling parameters; per-request policy and budget where the engine takes them."""
    params = {"temperature": 0, "max_new_tokens": sample.max_new_tokens}
    custom = {}
    if engines == "shared" and labels:
        # full: a budget covering the sequence takes the dense path, exactly --kv full's tokens
        custom["kv_budget"] = sample.length if policy.dense else budget_tokens(setting, sample.length)
        if not policy.dense:
            custom["kv_policy"] = labels[policy.label]
    elif engines == "policy" and not policy.dense:
        custom["kv_budget"] = budget_tokens(setting, sample.length)
    if custom:
        params["custom_params"] = custom
    return params


def generate(eng, sample: Sample, items: list[Item], labels: dict, engines: str, tokenizer, model: str) -> list[dict]:
    """Greedy answers of one prompt for each (policy, budget setting): the first request prefills,
    the rest reuse that prefill from the radix cache in one batch. A record's `seconds` is the wall
    time of the call that produced it (shared by a batch); `cached_tokens` the prompt tokens it
    found in the radix cache."""
    ids = tokenizer(render(tokenizer, sample.messages), add_special_tokens=False).input_ids
    outputs = []
    for batch in ([items[0]], items[1:]):
        if not batch:
            continue
        start = time.perf_counter()
        outs = eng.generate(
            input_ids=[ids] * len(batch),
            sampling_params=[request_params(sample, p, b, labels, engines) for p, b in batch],
        )
        seconds = round(time.perf_counter() - start, 3)
        outputs += [(p, b, o, seconds) for (p, b), o in zip(batch, outs)]
    records = []
    for policy, setting, out, seconds in outputs:
        budget = sample.length if setting is None else budget_tokens(setting, sample.length)
        records.append(
            {
                "policy": policy.label,
                "kv": policy.kv,
                "config": policy.config,
                "model": model,
                "task": sample.task,
                "family": sample.family,
                "scenario": sample.scenario,
                "length": sample.length,
                "seed": sample.seed,
                "budget_setting": setting,
                "budget": budget,
                "fraction": round(budget / sample.length, 6),
                "prompt_tokens": len(ids),
                "cached_tokens": out["meta_info"].get("cached_tokens"),
                "seconds": seconds,
                "answers": list(sample.answers),
                "output": out["text"],
                "score": score(sample, out["text"]),
            }
        )
    return records
