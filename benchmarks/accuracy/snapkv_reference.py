"""An independent SnapKV, to check the suite's `snapkv` answers and to ask why they miss.

    python -m benchmarks.accuracy.snapkv_reference --task niah_single --samples 3 --budget 0.25
    python -m benchmarks.accuracy.snapkv_reference --samples 3 --dense-layers 16   # layers 0-15 see everything
    python -m benchmarks.accuracy.snapkv_reference --samples 3 --keep-answer 8     # the needle kept in every layer

SnapKV written again on Hugging Face transformers instead of SGLang: its eager attention, its
RoPE, its KV cache, and none of this repository's policy, kernel or backend code. At the end of
the prefill the last `window` queries of each layer vote for prompt positions (softmax
attention summed over the window and over each KV head's query heads, pooled, best first after
the window itself, as `--kv snapkv` documents); every decode step then masks each KV head's
attention to the generated tokens plus the best-ranked prompt positions that fit the budget.
Greedy, chat template as in the suite. For each prompt it prints the reference's output next to
the `snapkv` answer saved by the suite (its results JSON or its unfinished .partial.jsonl), so a
difference between the two points at the SGLang implementation.

Two switches turn the reference into an experiment: `--dense-layers N` lets layers 0..N-1 attend
to everything, `--keep-answer K` adds the answer's prompt tokens (and the K before them, e.g. a
needle's key) to every layer's selection. If an answer recovers, what the selection dropped was
the cause.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from benchmarks.accuracy.run import find_result, load_result, saved_records
from benchmarks.common import RESULTS
from dynsplit_sglang.policies import SnapKVOptions

NAME = "snapkv_reference"


@dataclass
class Selection:
    """What the attention function applies while one prompt is generated.

    budget:       KV tokens a decode step attends to (generated tokens included); 0: attend to all.
    prompt_len:   prompt tokens.
    dense_layers: layers below this attend to everything.
    forced:       prompt positions every layer keeps besides its ranking.
    orders:       per layer [KvH, prompt_len] int64 prompt positions best first (set by the prefill).
    """

    budget: int
    prompt_len: int
    dense_layers: int = 0
    forced: list[int] = field(default_factory=list)
    orders: dict[int, torch.Tensor] = field(default_factory=dict)


def snap_order(weights: torch.Tensor, num_kv_heads: int, options: SnapKVOptions) -> torch.Tensor:
    """SnapKV's ranking of one layer's prompt positions: the window, newest first, then the rest
    by pooled window attention, best first.

    weights: [H, n, n] the prefill's softmax attention (causal). returns [KvH, n] int64.
    """
    heads, n, _ = weights.shape
    w = min(options.window, n)
    votes = weights[:, n - w :, : n - w].sum(1).view(num_kv_heads, heads // num_kv_heads, -1).sum(1)  # [KvH, n-w]
    pad = options.kernel_size // 2
    pool = F.max_pool1d if options.pooling == "max" else F.avg_pool1d
    votes = pool(votes[:, None], options.kernel_size, 1, pad)[:, 0]
    best = torch.argsort(votes, dim=1, descending=True, stable=True)
    window = torch.arange(n - 1, n - w - 1, -1)[None].expand(num_kv_heads, -1)
    return torch.cat([window, best], dim=1)


def decode_mask(order: torch.Tensor, budget: int, prompt_len: int, total: int, forced: list[int]) -> torch.Tensor:
    """[KvH, total] bool: the keys one KV head attends to at a decode step over `total` keys: the
    newest generated tokens (up to the budget), the first prompt positions of `order` that still
    fit, and `forced`. All of them while the sequence fits the budget."""
    kv_heads = order.shape[0]
    allowed = torch.zeros(kv_heads, total, dtype=torch.bool)
    if total <= budget:
        allowed[:] = True
        return allowed
    generated = min(total - prompt_len, budget)
    allowed[:, total - generated :] = True
    allowed.scatter_(1, order[:, : budget - generated], True)
    allowed[:, forced] = True
    return allowed


def reference_model(model_path: str):
    """(tokenizer, model, selection holder): the model's attention runs through `attend`, which
    reads the Selection put in holder[0] (None: plain causal attention)."""
    from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask
    from transformers.models.llama.modeling_llama import eager_attention_forward

    options = SnapKVOptions()
    holder: list[Selection | None] = [None]

    def attend(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        """query [1, H, q, D], key/value [1, KvH, t, D] (the whole cache)."""
        s, layer = holder[0], module.layer_idx
        if s is None or (query.shape[2] == 1 and layer < s.dense_layers):
            return eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
        if query.shape[2] > 1:  # the prefill: rank the prompt from its attention weights
            out, weights = eager_attention_forward(
                module, query, key, value, attention_mask, scaling, dropout, **kwargs
            )
            s.orders[layer] = snap_order(weights[0], key.shape[1], options)
            return out, weights
        total = key.shape[2]
        allowed = decode_mask(s.orders[layer], s.budget, s.prompt_len, total, s.forced)
        mask = torch.zeros(allowed.shape[0], total).masked_fill_(~allowed, float("-inf"))
        mask = mask.repeat_interleave(module.num_key_value_groups, 0)[None, :, None, :]  # [1, H, 1, t]
        if attention_mask is not None:
            mask = mask + attention_mask[..., -total:]
        return eager_attention_forward(module, query, key, value, mask, scaling, dropout, **kwargs)

    AttentionInterface.register(NAME, attend)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, eager_mask)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, attn_implementation=NAME)
    return tokenizer, model, holder


def generate(tokenizer, model, holder, ids: torch.Tensor, max_new_tokens: int, selection: Selection | None) -> str:
    """Greedy continuation of ids [1, n] under `selection` (None: full attention)."""
    holder[0] = selection
    try:
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    finally:
        holder[0] = None
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def suite_answers(path: str) -> dict[tuple, str]:
    """(task, length, seed, budget setting) -> output of the suite's `snapkv` answers saved at
    `path` (a .partial.jsonl, or a result: X.json.gz, else an older plain X.json; {} if there is none)."""
    if path.endswith(".jsonl"):
        records = saved_records(path)
    elif (found := find_result(path)) is not None:
        records = load_result(found)["samples"]
    else:
        return {}
    return {
        (r["task"], r["length"], r["seed"], r["budget_setting"]): r["output"]
        for r in records
        if r["policy"] == "snapkv"
    }


def parse_args(argv):
    from benchmarks.accuracy.tasks import TASKS

    p = argparse.ArgumentParser(
        prog="python -m benchmarks.accuracy.snapkv_reference", description=__doc__.splitlines()[0]
    )
    p.add_argument("--task", default="niah_single", choices=sorted(TASKS))
    p.add_argument("--length", type=int, default=2048, help="length setting in tokens (prompt + answer)")
    p.add_argument("--seed", type=int, default=0, help="the first sample's seed")
    p.add_argument("--samples", type=int, default=1, help="how many samples (seeds from --seed on)")
    p.add_argument("--budget", type=float, default=0.25, help="KV budget: <= 1 a fraction of the length, > 1 tokens")
    p.add_argument("--dense-layers", type=int, default=0, metavar="N", help="layers 0..N-1 attend to everything")
    p.add_argument(
        "--keep-answer",
        type=int,
        default=None,
        metavar="K",
        help="every layer also keeps the answer's prompt tokens and the K tokens before them",
    )
    p.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument(
        "--results",
        default=None,
        help="the suite's answers to compare with (default: "
        "benchmarks/results/accuracy.json.gz, else its .partial.jsonl)",
    )
    args = p.parse_args(argv)
    if args.samples < 1:
        p.error(f"--samples {args.samples}: at least 1")
    if args.budget <= 0:
        p.error(f"--budget {args.budget}: must be positive")
    if args.keep_answer is not None and args.keep_answer < 0:
        p.error(f"--keep-answer {args.keep_answer}: must be 0 or more")
    return args


def main(argv=None) -> list[dict]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from benchmarks.accuracy.blocks import find
    from benchmarks.accuracy.run import budget_tokens
    from benchmarks.accuracy.scoring import score
    from benchmarks.accuracy.tasks import make_sample, render
    from dynsplit_sglang.default_model import smollm2_path

    args = parse_args(argv)
    results = args.results or find_result(os.path.join(RESULTS, "accuracy.json.gz"))
    if results is None:
        results = os.path.join(RESULTS, "accuracy.partial.jsonl")
    saved = suite_answers(results)
    tokenizer, model, holder = reference_model(str(args.model or smollm2_path()))
    budget = budget_tokens(args.budget, args.length)
    rows = []
    print(
        f"SnapKV reference, budget {budget}, dense layers < {args.dense_layers}, keep answer "
        f"{'no' if args.keep_answer is None else f'+{args.keep_answer} before it'}; suite answers from {results}"
    )
    print("| seed | gold | full | reference | suite `snapkv` | same |\n| --- | --- | --- | --- | --- | --- |")
    for seed in range(args.seed, args.seed + args.samples):
        sample = make_sample(tokenizer, args.task, args.length, seed)
        ids = tokenizer(render(tokenizer, sample.messages), add_special_tokens=False, return_tensors="pt").input_ids
        n = ids.shape[1]
        if budget >= n:
            raise SystemExit(
                f"--budget {args.budget} is {budget} tokens, not less than the {n}-token prompt: nothing to select"
            )
        forced = []
        if args.keep_answer is not None:
            span = find(ids[0].tolist(), tokenizer, sample.answers[0])
            if span is None:
                raise SystemExit(f"{args.task} seed {seed}: the answer {sample.answers[0]!r} is not in the prompt")
            forced = list(range(max(0, span[0] - args.keep_answer), span[1] + 1))  # end inclusive
        full = generate(tokenizer, model, holder, ids, sample.max_new_tokens, None)
        ref = generate(
            tokenizer, model, holder, ids, sample.max_new_tokens, Selection(budget, n, args.dense_layers, forced)
        )
        suite = saved.get((args.task, args.length, seed, args.budget))
        row = {
            "seed": seed,
            "gold": list(sample.answers),
            "full": full,
            "reference": ref,
            "suite": suite,
            "reference_score": score(sample, ref),
        }
        rows.append(row)
        plain = args.dense_layers == 0 and not forced  # else the reference is an experiment, not a check
        same = "-" if suite is None or not plain else ("yes" if suite == ref else "no")
        print(
            f"| {seed} | {', '.join(sample.answers)} | {full!r} | {ref!r} | "
            f"{'-' if suite is None else repr(suite)} | {same} |",
            flush=True,
        )
    return rows


if __name__ == "__main__":
    main()
