"""Would sharing a layer's budget among its KV heads help? An oracle bound from real attention.

    python -m benchmarks.accuracy.head_budgets                       # frequent_words and niah_multikey, 2k and 8k
    python -m benchmarks.accuracy.head_budgets --tasks frequent_words --lengths 8192 --seeds 1000-1004

DynSplit-KV and Quest give every KV head the same budget: each head keeps the sink, the recent
window and its own best blocks up to `--kv-budget` tokens. Per-KV-head budget sharing (as Ada-KV
does for prefill-time eviction) lets the heads of a layer split KvH x budget among them, so a head
whose attention is spread out takes blocks from one whose attention is concentrated.

This measures the most that can buy, with the selection itself taken out of the question: the
model (SmolLM2-135M-Instruct, fp32, transformers) reads the suite's prompt and answers it greedily
with full attention; at every answer step, in every layer, each KV head's attention over the
prompt (summed over its query heads) is cut into 16-token blocks, and the blocks are chosen by
their *true* attention mass (an oracle; Quest's and DynSplit-KV's scores only estimate it):

- per head: each head its own top-k blocks, k = (budget - 64) / 16 (dynsplit's defaults keep 64
  tokens whatever the scores: sink, open block and recent window);
- shared:   the top KvH x k (head, block) pairs of the layer, however they fall on the heads.

Recall is the attention mass a head's kept tokens (sink, last 32 tokens, chosen blocks) carry, of
its whole attention (the sink alone holds most of it); "blocks' mass" the share of the attention on
the choosable blocks (summed over the layer's heads) that the chosen ones carry; "largest head
share" the share of the layer's KvH x k blocks its most-served head takes when shared (1/KvH if
shared equally). Each is a mean over heads, layers, answer steps and prompts. If even the oracle
gains little from sharing, a shared selection cannot close an accuracy gap either. The result
(JSON, with the table) goes to benchmarks/results/head_budget_sharing.json.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from tqdm import tqdm

from benchmarks.accuracy.__main__ import parse_budgets, parse_seeds
from benchmarks.accuracy.tasks import make_sample, render
from benchmarks.common import RESULTS, run_info

BLOCK = 16
SINK, RECENT, ALWAYS_KEPT = 4, 32, 64  # dynsplit's defaults: 4 + 32, plus up to 28 of open block


def block_mass(mass: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """mass [KvH, n] of the prompt's keys -> (always kept [KvH], blocks [KvH, nb]): the sink and
    the last RECENT tokens, and the 16-token blocks between them."""
    lo, hi = SINK, n - RECENT
    nb = (hi - lo) // BLOCK
    blocks = mass[:, lo : lo + nb * BLOCK].reshape(mass.shape[0], nb, BLOCK).sum(-1)
    kept = mass[:, :lo].sum(-1) + mass[:, lo + nb * BLOCK :].sum(-1)
    return kept, blocks


def recalls(kept: torch.Tensor, blocks: torch.Tensor, k: int) -> tuple[float, float, float, float, float]:
    """Means over heads of the recall per head and shared; the share of the blocks' mass (summed
    over heads) the chosen blocks carry, per head and shared; the largest share of the KvH x k
    blocks one head takes when shared. kept [KvH], blocks [KvH, nb]: mass fractions."""
    heads, nb = blocks.shape
    k = min(k, nb)
    own = blocks.topk(k, dim=-1).values.sum(-1)
    top = blocks.flatten().topk(heads * k).indices
    taken = torch.zeros_like(blocks).flatten()
    taken[top] = 1
    taken = taken.view(heads, nb)
    shared = (blocks * taken).sum(-1)
    total = float(blocks.sum().clamp_min(1e-12))
    return (
        float((kept + own).mean()),
        float((kept + shared).mean()),
        float(own.sum()) / total,
        float(shared.sum()) / total,
        float(taken.sum(-1).max() / max(1, heads * k)),
    )


def answer_attention(model, ids: list[int], steps: int, eos: int | None):
    """Greedy answer with full attention; yields, per step, each layer's attention of the new
    token over all keys: a list of [H, n_keys] tensors."""
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        out = model(input_ids=torch.tensor([ids]), use_cache=True)
        past, token = out.past_key_values, int(out.logits[0, -1].argmax())
        model.set_attn_implementation("eager")  # attention weights of the one-token steps only
        for _ in range(steps):
            if token == eos:
                return
            out = model(input_ids=torch.tensor([[token]]), past_key_values=past, use_cache=True, output_attentions=True)
            past, token = out.past_key_values, int(out.logits[0, -1].argmax())
            yield [a[0, :, 0, :] for a in out.attentions]


def measure(model, tokenizer, sample, budgets: list[int], kv_heads: int) -> dict:
    ids = tokenizer(render(tokenizer, sample.messages), add_special_tokens=False).input_ids
    n = len(ids)
    names = ("per_head", "shared", "blocks_per_head", "blocks_shared", "max_head_share")
    sums = {b: [0.0] * len(names) for b in budgets}
    count = 0
    for layers in answer_attention(model, ids, sample.max_new_tokens, tokenizer.eos_token_id):
        for attn in layers:
            heads = attn.shape[0]
            mass = attn.float().view(kv_heads, heads // kv_heads, -1).sum(1) / (heads // kv_heads)  # [KvH, keys]
            generated = mass[:, n:].sum(-1)  # the answer's own tokens: always attended
            kept, blocks = block_mass(mass[:, :n], n)
            for b in budgets:
                for i, value in enumerate(recalls(kept + generated, blocks, (b - ALWAYS_KEPT) // BLOCK)):
                    sums[b][i] += value
            count += 1
    return {
        "task": sample.task,
        "length": sample.length,
        "seed": sample.seed,
        "prompt_tokens": n,
        "layer_steps": count,
        "by_budget": {str(b): {name: v / count for name, v in zip(names, s)} for b, s in sums.items()},
    }


def table(rows: list[dict], fractions: list[float]) -> str:
    lines = [
        "| task | length | budget | prompts | recall, per head | shared | gain | blocks' mass, per head | shared "
        "| gain | largest head share |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    keys = sorted({(r["task"], r["length"]) for r in rows})
    for task, length in keys:
        mine = [r for r in rows if (r["task"], r["length"]) == (task, length)]
        for f in fractions:
            b = str(int(f * length))
            m = {k: sum(r["by_budget"][b][k] for r in mine) / len(mine) for k in mine[0]["by_budget"][b]}
            lines.append(
                f"| {task} | {length} | {b} (1/{round(1 / f)}) | {len(mine)} | {m['per_head']:.3f} | {m['shared']:.3f} "
                f"| {m['shared'] - m['per_head']:+.3f} | {m['blocks_per_head']:.3f} | {m['blocks_shared']:.3f} "
                f"| {m['blocks_shared'] - m['blocks_per_head']:+.3f} | {m['max_head_share']:.2f} |"
            )
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.accuracy.head_budgets", description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default="frequent_words,niah_multikey")
    p.add_argument("--lengths", default="2048,8192")
    p.add_argument("--seeds", default="1000-1009", help="development seeds (A-B or a list)")
    p.add_argument("--budgets", default="0.125,0.0625", help="fractions of the length")
    p.add_argument("--out", default=os.path.join(RESULTS, "head_budget_sharing.json"))
    args = p.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dynsplit_sglang.default_model import smollm2_path

    fractions = list(parse_budgets(args.budgets))
    if any(f >= 1 for f in fractions):
        raise SystemExit("--budgets: fractions of the length (< 1), e.g. 0.125,0.0625")
    path = str(smollm2_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    kv_heads = model.config.num_key_value_heads
    work = [
        (t, int(n), s) for t in args.tasks.split(",") for n in args.lengths.split(",") for s in parse_seeds(args.seeds)
    ]
    rows = []
    for task, length, seed in tqdm(work, desc="prompts", unit="prompt"):
        sample = make_sample(tokenizer, task, length, seed)
        budgets = [int(f * length) for f in fractions]
        if min(budgets) <= ALWAYS_KEPT:
            raise SystemExit(f"--budgets: {min(budgets)} tokens at {length} leave no block to choose (>{ALWAYS_KEPT})")
        rows.append(measure(model, tokenizer, sample, budgets, kv_heads))
    text = table(rows, fractions)
    result = {**run_info(), "model": os.path.basename(path), "block": BLOCK, "always_kept": ALWAYS_KEPT, "rows": rows}
    result["table"] = text
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
