"""Where a block policy's blocks fall around a prompt's answer: the evidence behind the accuracy
suite's "why", e.g. whether a needle's key and its value share a block or are cut apart.

    python -m benchmarks.accuracy.blocks --task niah_single --seed 2                 # dynsplit and dynsplit-fixed
    python -m benchmarks.accuracy.blocks --task records_jsonl --length 4096 --kv dynsplit,dynsplit-punct
    python -m benchmarks.accuracy.blocks --task niah_single --samples 30 --kept 1     # a summary table

One engine runs every policy given (dynsplit or a split-rule variant, as the suite's shared engine
does: one prefill per prompt) and answers the suite's prompt at --budget with each, its block
trace on; then this prints the answer, each policy's output and the blocks within --around tokens
of the answer's first occurrence in the prompt, one line per block.
`--kept` also prints, for the first decode steps, how many of the answer's prompt tokens each
layer's selection kept, per KV head (one digit per head, 9 for 9 or more): whether the blocks
holding the answer were chosen, not only where they end.

With `--samples N` (seeds --seed .. --seed+N-1) every policy answers all N prompts, each policy's
in one batch, and a table sums them up per policy: the score, how often a block boundary cuts the answer
in two, and (with --kept STEPS) the share of the answer's tokens that the first STEPS decode steps
kept, over layers and KV heads, how often a KV head kept the whole answer, and that rate per layer. `--lead N`
counts the N prompt tokens before the answer as part of it: whether its key stays with it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import tempfile
from dataclasses import dataclass, replace

from benchmarks.accuracy.policies import engine_args, parse_policies, shared_engine
from benchmarks.accuracy.scoring import score
from benchmarks.accuracy.tasks import TASKS, Sample, make_sample, render
from dynsplit_sglang.testing.process_setup import in_sglang_processes

BLOCK_POLICIES = ("dynsplit",)  # the policy that cuts blocks and traces them (quest = dynsplit-fixed's pages)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.accuracy.blocks", description=__doc__.splitlines()[0])
    p.add_argument("--task", default="niah_single", choices=sorted(TASKS))
    p.add_argument("--length", type=int, default=2048, help="length setting in tokens (prompt + answer)")
    p.add_argument("--seed", type=int, default=0, help="the (first) sample's seed")
    p.add_argument(
        "--samples",
        type=int,
        default=1,
        help="how many samples (seeds from --seed on); more than 1 prints a summary table",
    )
    p.add_argument(
        "--kv", default="dynsplit,dynsplit-fixed", help="block policies or split-rule variants, comma-separated"
    )
    p.add_argument("--budget", type=float, default=0.125, help="KV budget: <= 1 a fraction of the length, > 1 tokens")
    p.add_argument("--around", type=int, default=24, help="tokens of context shown on each side of the answer")
    p.add_argument(
        "--lead",
        type=int,
        default=0,
        help="count this many prompt tokens before the answer as part of it (e.g. a needle's key, "
        "'for chubby-bet is:'), for the kept counts and the answer-cut rate",
    )
    p.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument(
        "--kept",
        type=int,
        default=0,
        metavar="STEPS",
        help="also show, for the first STEPS decode steps, the answer tokens each layer's selection kept",
    )
    args = p.parse_args(argv)
    policies = parse_policies(args.kv)
    for policy in policies:
        if policy.kv not in BLOCK_POLICIES:
            p.error(f"--kv {policy.label}: only dynsplit and its split-rule variants trace their blocks")
    if args.samples < 1:
        p.error(f"--samples {args.samples}: at least 1")
    if args.lead < 0:
        p.error(f"--lead {args.lead}: 0 or more tokens")
    budget = int(args.budget * args.length) if args.budget <= 1 else int(args.budget)
    if budget < 1 or budget > args.length:
        p.error(f"--budget {args.budget} gives {budget} tokens; it must be between 1 and --length {args.length}")
    return args, policies, budget


@dataclass
class Prompt:
    """One sample as the engine sees it. span: (first, last) prompt position of the answer, or None."""

    rid: str
    sample: Sample
    ids: list[int]
    span: tuple[int, int] | None


def find(ids: list[int], tokenizer, answer: str) -> tuple[int, int] | None:
    """(start, end) token positions of the answer's first occurrence, tokenized alone or after a space."""
    for text in (answer, " " + answer):
        sub = tokenizer(text, add_special_tokens=False).input_ids
        for i in range(len(ids) - len(sub) + 1):
            if ids[i : i + len(sub)] == sub:
                return i, i + len(sub) - 1
    return None


def blocks_by_request(trace_path: str) -> dict[str, list[list[int]]]:
    """[start, end] of every closed block of each request in a trace (its last event), positions inclusive."""
    with open(trace_path) as f:
        events = [json.loads(line) for line in f]
    return {e["rid"]: e["blocks"] for e in events if e.get("event") == "blocks"}


def probe_selection() -> None:
    """The setup for --kept, run in the engine's processes (`in_sglang_processes`): in the scheduler,
    log how many positions of each request's answer span ($BLOCKS_PROBE_SPANS, a JSON file
    {rid: [first, last]}) each decode selection keeps, per KV head, to $BLOCKS_PROBE_LOG. Any other
    process selects nothing: left alone."""
    if multiprocessing.current_process().name == "MainProcess":
        return
    import torch

    from dynsplit_sglang.policies.dynsplit import DynSplitPolicy

    with open(os.environ["BLOCKS_PROBE_SPANS"]) as f:
        spans = json.load(f)
    select_runs = DynSplitPolicy._select_runs  # what select_batch and select_slots_batch both call

    def logged(self, layer_id, indices, index, q):
        positions, counts = select_runs(self, layer_id, indices, index, q)  # [R, KvH, B], [R, KvH]
        valid = torch.arange(positions.shape[2], device=positions.device) < counts[:, :, None]
        with open(os.environ["BLOCKS_PROBE_LOG"], "a") as f:
            for k, i in enumerate(indices):
                r = self._reqs[i]
                if r.rid not in spans:
                    continue
                lo, hi = spans[r.rid]
                kept = ((positions[k] >= lo) & (positions[k] <= hi) & valid[k]).sum(-1)  # [KvH]
                f.write(
                    json.dumps({"rid": r.rid, "seq_len": r.seq_len, "layer": layer_id, "kept": kept.tolist()}) + "\n"
                )
        return positions, counts

    DynSplitPolicy._select_runs = logged


def kept_steps(log: str) -> dict[str, list[tuple[int, list[list[int]]]]]:
    """Per request, its decode steps in order: (sequence length, per layer the kept count per KV head)."""
    if not os.path.exists(log):
        return {}
    by_request = {}  # rid -> seq_len -> layer -> kept per KV head
    with open(log) as f:
        for line in f:
            r = json.loads(line)
            by_request.setdefault(r["rid"], {}).setdefault(r["seq_len"], {})[r["layer"]] = r["kept"]
    return {
        rid: [(n, [layers[i] for i in sorted(layers)]) for n, layers in sorted(steps.items())]
        for rid, steps in by_request.items()
    }


def answer_cut(blocks: list[list[int]], span: tuple[int, int]) -> bool:
    """Whether a block boundary falls inside the answer (no closed block holds all of it)."""
    return not any(start <= span[0] and span[1] <= end for start, end in blocks)


def run_policies(policies, prompts: list[Prompt], budget: int, model: str, probe: bool) -> dict[str, dict[str, dict]]:
    """One engine runs every policy (the first of them as --kv, the others as --kv-variants, each
    with its own block trace) and answers every prompt with each: the first policy's requests
    prefill the prompts in one batch, the others' follow in one batch that finds them in the radix
    cache, as the suite's shared engine does. With `probe` the selection probe is on.
    Per policy label, per prompt rid: output, score, blocks (every closed block), kept (kept_steps)."""
    import sglang as sgl

    def rid(policy, prompt: Prompt) -> str:
        return f"{policy.label}/{prompt.rid}"

    with tempfile.TemporaryDirectory() as tmp:
        traces = {p.label: os.path.join(tmp, f"trace-{k}.jsonl") for k, p in enumerate(policies)}
        log, spans = (os.path.join(tmp, name) for name in ("kept.jsonl", "spans.json"))
        with open(spans, "w") as f:
            json.dump({rid(policy, p): p.span for policy in policies for p in prompts if p.span}, f)
        traced = [replace(p, config={**p.config, "trace_path": traces[p.label]}) for p in policies]
        kwargs, labels = shared_engine(traced, budget)
        probe_env = dict(BLOCKS_PROBE_SPANS=spans, BLOCKS_PROBE_LOG=log) if probe else {}
        os.environ.update(probe_env)  # read by the scheduler process when it starts
        setup = in_sglang_processes("benchmarks.accuracy.blocks:probe_selection") if probe else contextlib.nullcontext()
        longest = max(len(p.ids) + p.sample.max_new_tokens for p in prompts)
        # the prompts once (shared through the radix cache), plus every request's answer
        tokens = (len(prompts) + 1) * longest + len(policies) * sum(p.sample.max_new_tokens for p in prompts)
        with setup:  # the processes the engine starts run the probe
            eng = sgl.Engine(**engine_args(kwargs, model, tokens, "cpu"))
        outputs = {}
        try:
            for batch in (policies[:1], policies[1:]):
                todo = [(policy, p) for policy in batch for p in prompts]
                if not todo:
                    continue
                params = [
                    {
                        "temperature": 0,
                        "max_new_tokens": p.sample.max_new_tokens,
                        "custom_params": {"kv_policy": labels[policy.label], "kv_budget": budget},
                    }
                    for policy, p in todo
                ]
                outs = eng.generate(
                    input_ids=[p.ids for _, p in todo],
                    rid=[rid(policy, p) for policy, p in todo],
                    sampling_params=params,
                )
                outputs.update({rid(policy, p): out["text"] for (policy, p), out in zip(todo, outs)})
        finally:
            eng.shutdown()
            for name in probe_env:
                os.environ.pop(name, None)
        kept = kept_steps(log)
        seen = {}
        for policy in policies:
            blocks = blocks_by_request(traces[policy.label])
            seen[policy.label] = {
                p.rid: {
                    "output": outputs[rid(policy, p)],
                    "score": score(p.sample, outputs[rid(policy, p)]),
                    "blocks": blocks.get(rid(policy, p), []),
                    "kept": kept.get(rid(policy, p), []),
                }
                for p in prompts
            }
    return seen


def print_detail(tokenizer, prompt: Prompt, label: str, seen: dict, around: int, steps: int) -> list[list[int]]:
    """The one-sample report of a policy; returns the blocks near the answer."""
    ids, span = prompt.ids, prompt.span
    lo, hi = (span[0] - around, span[1] + around) if span else (len(ids) - 2 * around, len(ids))
    near = [b for b in seen["blocks"] if b[1] >= lo and b[0] <= hi]
    print(
        f"\n{label}: output {seen['output']!r} (score {seen['score']:.2f}); "
        f"{len(seen['blocks'])} blocks, those near the answer:"
    )
    for start, end in near:
        print(f"  [{start:5d}, {end:5d}] {tokenizer.decode(ids[start : end + 1])!r}")
    if steps and not seen["kept"]:
        print("  no decode step selected (the sequence stayed within the budget)")
    for seq_len, layers in seen["kept"][:steps]:
        print(
            f"  step at length {seq_len}, answer tokens kept by layer: "
            + " ".join("".join(str(min(k, 9)) for k in heads) for heads in layers)
        )
    return near


def summary_row(label: str, prompts: list[Prompt], seen: dict[str, dict], steps: int) -> dict:
    """Means over the samples of one policy; "mean block" is the length in tokens of their closed
    blocks, pooled; the answer columns count the samples whose answer is
    in the prompt, and the kept columns their first `steps` decode steps, every layer and KV head.
    "whole answer by layer" is a digit per layer: tenths of its KV heads that kept all of the
    answer (9 for 90% or more)."""
    located = [p for p in prompts if p.span]
    closed = [end - start + 1 for p in prompts for start, end in seen[p.rid]["blocks"]]
    row = {
        "policy": label,
        "score": sum(seen[p.rid]["score"] for p in prompts) / len(prompts),
        # the realised C: a token budget holds fewer blocks when they come out longer
        "mean block": sum(closed) / max(len(closed), 1),
        "answer cut": sum(answer_cut(seen[p.rid]["blocks"], p.span) for p in located) / max(len(located), 1),
    }
    if steps:
        share, layer_whole, layer_heads = 0.0, {}, {}
        for p in located:
            length = p.span[1] - p.span[0] + 1
            for _, layers in seen[p.rid]["kept"][:steps]:
                for layer, per_head in enumerate(layers):
                    share += sum(per_head) / length
                    layer_whole[layer] = layer_whole.get(layer, 0) + sum(k == length for k in per_head)
                    layer_heads[layer] = layer_heads.get(layer, 0) + len(per_head)
        heads = max(sum(layer_heads.values()), 1)
        row["answer kept"] = share / heads
        row["whole answer"] = sum(layer_whole.values()) / heads
        row["whole answer by layer"] = "".join(
            str(min(9, int(10 * layer_whole[i] / layer_heads[i]))) for i in sorted(layer_heads)
        )
    return row


def main(argv=None):
    args, policies, budget = parse_args(argv)
    from transformers import AutoTokenizer

    from dynsplit_sglang.default_model import smollm2_path

    model = args.model or str(smollm2_path())
    tokenizer = AutoTokenizer.from_pretrained(model)
    prompts = []
    for seed in range(args.seed, args.seed + args.samples):
        sample = make_sample(tokenizer, args.task, args.length, seed)
        ids = tokenizer(render(tokenizer, sample.messages), add_special_tokens=False).input_ids
        span = find(ids, tokenizer, sample.answers[0])
        if span and args.lead:
            span = (max(0, span[0] - args.lead), span[1])
        prompts.append(Prompt(f"blocks-{args.task}-{args.length}-{seed}", sample, ids, span))
    if args.kept and not any(p.span for p in prompts):
        raise SystemExit("--kept needs the answer to occur in the prompt")
    if args.samples == 1:
        p = prompts[0]
        found = find(p.ids, tokenizer, p.sample.answers[0])
        where = f"prompt tokens {found[0]}..{found[1]}" if found else "not found verbatim in the prompt"
        print(
            f"{args.task}, {args.length} tokens, seed {args.seed}: {len(p.ids)} prompt tokens, budget {budget}; "
            f"answer {p.sample.answers[0]!r} at {where}"
        )
    shown, rows = {}, []
    answered = run_policies(policies, prompts, budget, model, probe=bool(args.kept))
    for policy in policies:
        seen = answered[policy.label]
        if args.samples == 1:
            seen_one = seen[prompts[0].rid]
            near = print_detail(tokenizer, prompts[0], policy.label, seen_one, args.around, args.kept)
            shown[policy.label] = {"output": seen_one["output"], "score": seen_one["score"], "blocks": near}
        else:
            rows.append(summary_row(policy.label, prompts, seen, args.kept))
            shown[policy.label] = seen
    if rows:
        located = sum(p.span is not None for p in prompts)
        print(
            f"{args.task}, {args.length} tokens, seeds {args.seed}..{args.seed + args.samples - 1}, budget {budget}; "
            f"answer found in {located} of {len(prompts)} prompts"
            + (f"; with the {args.lead} tokens before it" if args.lead else "")
        )
        print("| " + " | ".join(rows[0]) + " |\n|" + " --- |" * len(rows[0]))
        for row in rows:
            print("| " + " | ".join(v if isinstance(v, str) else f"{v:.2f}" for v in row.values()) + " |")
    return shown


if __name__ == "__main__":
    main()
