"""Where a block policy's blocks fall around a prompt's answer: the evidence behind the accuracy
suite's "why", e.g. DD-Select ending a needle's block at "is:" so that its value starts the next.

    python -m benchmarks.accuracy.blocks --task niah_single --seed 2                 # dynsplit and dynsplit-fixed
    python -m benchmarks.accuracy.blocks --task records_jsonl --length 4096 --kv dynsplit,dynsplit-punct

For each policy (dynsplit or a split-rule variant) an engine answers the suite's prompt at
--budget with its block trace on, then this prints the answer, the policy's output and the blocks
within --around tokens of the answer's first occurrence in the prompt, one line per block.
`--kept` also prints, for the first decode steps, how many of the answer's prompt tokens each
layer's selection kept, per KV head (one digit per head, 9 for 9 or more): whether the blocks
holding the answer were chosen, not only where they end.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import tempfile

from benchmarks.accuracy.policies import engine_args, parse_policies, policy_engine_kwargs
from benchmarks.accuracy.scoring import score
from benchmarks.accuracy.tasks import TASKS, make_sample, render

BLOCK_POLICIES = ("dynsplit",)  # the policy that cuts blocks and traces them (quest = dynsplit-fixed's pages)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.accuracy.blocks", description=__doc__.splitlines()[0])
    p.add_argument("--task", default="niah_single", choices=sorted(TASKS))
    p.add_argument("--length", type=int, default=2048, help="length setting in tokens (prompt + answer)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kv", default="dynsplit,dynsplit-fixed", help="block policies or split-rule variants, comma-separated")
    p.add_argument("--budget", type=float, default=0.125, help="KV budget: <= 1 a fraction of the length, > 1 tokens")
    p.add_argument("--around", type=int, default=24, help="tokens of context shown on each side of the answer")
    p.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--kept", type=int, default=0, metavar="STEPS",
                   help="also show, for the first STEPS decode steps, the answer tokens each layer's selection kept")
    args = p.parse_args(argv)
    policies = parse_policies(args.kv)
    for policy in policies:
        if policy.kv not in BLOCK_POLICIES:
            p.error(f"--kv {policy.label}: only dynsplit and its split-rule variants trace their blocks")
    budget = int(args.budget * args.length) if args.budget <= 1 else int(args.budget)
    if budget < 1 or budget > args.length:
        p.error(f"--budget {args.budget} gives {budget} tokens; it must be between 1 and --length {args.length}")
    return args, policies, budget


def find(ids: list[int], tokenizer, answer: str) -> tuple[int, int] | None:
    """(start, end) token positions of the answer's first occurrence, tokenized alone or after a space."""
    for text in (answer, " " + answer):
        sub = tokenizer(text, add_special_tokens=False).input_ids
        for i in range(len(ids) - len(sub) + 1):
            if ids[i : i + len(sub)] == sub:
                return i, i + len(sub) - 1
    return None


def blocks_of(trace_path: str) -> list[list[int]]:
    """[start, end] of every closed block of the (only) request in a trace, positions inclusive."""
    with open(trace_path) as f:
        events = [json.loads(line) for line in f]
    return [e for e in events if e.get("event") == "blocks"][-1]["blocks"]


def probe_selection() -> None:
    """DYNSPLIT_EXTRA_SETUP for --kept: in the scheduler, log how many positions of
    $BLOCKS_PROBE_SPAN ("lo,hi") each decode selection keeps, per KV head, to $BLOCKS_PROBE_LOG.
    The plugin runs it in the launching process too, which selects nothing: left alone."""
    if multiprocessing.current_process().name == "MainProcess":
        return
    from dynsplit_sglang.policies.dynsplit import DynSplitPolicy

    lo, hi = (int(x) for x in os.environ["BLOCKS_PROBE_SPAN"].split(","))
    select_batch = DynSplitPolicy.select_batch

    def logged(self, layer_id, req_indices, q):
        positions, valid = select_batch(self, layer_id, req_indices, q)
        kept = ((positions >= lo) & (positions <= hi) & valid).sum(-1)  # [R, KvH]
        with open(os.environ["BLOCKS_PROBE_LOG"], "a") as f:
            for k, i in enumerate(req_indices):
                f.write(json.dumps({"seq_len": self._reqs[i].seq_len, "layer": layer_id, "kept": kept[k].tolist()}) + "\n")
        return positions, valid

    DynSplitPolicy.select_batch = logged


def print_kept(log: str, steps: int) -> None:
    if not os.path.exists(log):
        print("  no decode step selected (the sequence stayed within the budget)")
        return
    with open(log) as f:
        rows = [json.loads(line) for line in f]
    for seq_len in sorted({r["seq_len"] for r in rows})[:steps]:
        layers = sorted((r for r in rows if r["seq_len"] == seq_len), key=lambda r: r["layer"])
        print(f"  step at length {seq_len}, answer tokens kept by layer: "
              + " ".join("".join(str(min(k, 9)) for k in r["kept"]) for r in layers))


def main(argv=None):
    args, policies, budget = parse_args(argv)
    import sglang as sgl
    from transformers import AutoTokenizer

    from dynsplit_sglang.default_model import smollm2_path

    model = args.model or str(smollm2_path())
    tokenizer = AutoTokenizer.from_pretrained(model)
    sample = make_sample(tokenizer, args.task, args.length, args.seed)
    ids = tokenizer(render(tokenizer, sample.messages), add_special_tokens=False).input_ids
    span = find(ids, tokenizer, sample.answers[0])
    where = f"prompt tokens {span[0]}..{span[1]}" if span else "not found verbatim in the prompt"
    print(f"{args.task}, {args.length} tokens, seed {args.seed}: {len(ids)} prompt tokens, budget {budget}; "
          f"answer {sample.answers[0]!r} at {where}")
    lo, hi = (span[0] - args.around, span[1] + args.around) if span else (len(ids) - 2 * args.around, len(ids))
    if args.kept and not span:
        raise SystemExit("--kept needs the answer to occur in the prompt")
    shown = {}
    for policy in policies:
        with tempfile.TemporaryDirectory() as tmp:
            trace, probe = os.path.join(tmp, "trace.jsonl"), os.path.join(tmp, "kept.jsonl")
            kwargs = policy_engine_kwargs(policy, budget)
            kwargs["kv_config"] = {**kwargs.get("kv_config", {}), "trace_path": trace}
            if args.kept:  # read by the scheduler process when it starts
                os.environ.update(DYNSPLIT_EXTRA_SETUP="benchmarks.accuracy.blocks:probe_selection",
                                  BLOCKS_PROBE_SPAN=f"{span[0]},{span[1]}", BLOCKS_PROBE_LOG=probe)
            eng = sgl.Engine(**engine_args(kwargs, model, 2 * (len(ids) + sample.max_new_tokens), "cpu"))
            try:
                out = eng.generate(input_ids=ids, sampling_params={"temperature": 0, "max_new_tokens": sample.max_new_tokens})
            finally:
                eng.shutdown()
                for name in ("DYNSPLIT_EXTRA_SETUP", "BLOCKS_PROBE_SPAN", "BLOCKS_PROBE_LOG") if args.kept else ():
                    os.environ.pop(name, None)
            blocks = blocks_of(trace)
            near = [b for b in blocks if b[1] >= lo and b[0] <= hi]
            shown[policy.label] = {"output": out["text"], "score": score(sample, out["text"]), "blocks": near}
            print(f"\n{policy.label}: output {out['text']!r} (score {shown[policy.label]['score']:.2f}); "
                  f"{len(blocks)} blocks, those near the answer:")
            for start, end in near:
                print(f"  [{start:5d}, {end:5d}] {tokenizer.decode(ids[start : end + 1])!r}")
            if args.kept:
                print_kept(probe, args.kept)
    return shown


if __name__ == "__main__":
    main()
