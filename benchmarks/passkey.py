"""Passkey accuracy of `--kv full` and `--kv dynsplit` at budgets that are fractions of the
prompt, plus the decode-step time of dynsplit over full at the longest length, in one run.

    python -m benchmarks.passkey                       # 2k and 4k prompts, budgets 1/4 and 1/8, 20 samples
    python -m benchmarks.passkey --quick               # a pipeline check on the tiny random model

Runs SGLang in process (`sgl.Engine`, the same code path as the server) on the embedded
SmolLM2-135M-Instruct, greedy, chat template applied. Prints a table and writes JSON under
benchmarks/results/ (per-sample answers included). Interrupted runs resume from the .partial.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from tqdm import tqdm

from benchmarks.common import RESULTS, run_info
from dynsplit_sglang.passkey import is_correct, make_sample


def engine(model_path: str, kv: str, budget: int | None):
    import sglang as sgl

    kv_args = {"kv": "dynsplit", "kv_budget": budget} if kv == "dynsplit" else {"attention_backend": "torch_native"}
    return sgl.Engine(
        model_path=model_path,
        device="cpu",
        dtype="float32",
        max_total_tokens=16384,
        skip_server_warmup=True,
        disable_overlap_schedule=True,
        disable_radix_cache=True,
        log_level="error",
        **kv_args,
    )


def decode_step_ms(eng, prompt: str, steps: int) -> float:
    """Mean time of one decode step: (time of 1 + steps tokens - time of 1 token) / steps."""

    def timed(n):
        t = time.perf_counter()
        eng.generate(prompt, {"temperature": 0, "max_new_tokens": n, "ignore_eos": True})
        return time.perf_counter() - t

    timed(1)  # warm-up
    one = min(timed(1) for _ in range(2))
    many = min(timed(1 + steps) for _ in range(2))
    return 1000 * (many - one) / steps


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="2048,4096", help="prompt lengths in tokens")
    p.add_argument("--fractions", default="0.25,0.125", help="dynsplit budgets as fractions of the prompt")
    p.add_argument("--samples", type=int, default=20)
    p.add_argument("--decode-steps", type=int, default=32, help="decode steps timed at the longest length")
    p.add_argument("--quick", action="store_true", help="tiny random model, 2 short samples: checks the pipeline only")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/passkey[_quick].json)")
    p.add_argument("--replot", action="store_true", help="only redraw the plot and table from the JSON at --out")
    args = p.parse_args(argv)
    if args.replot:
        out = args.out or os.path.join(RESULTS, "passkey.json")
        with open(out) as fh:
            result = json.load(fh)
        plot(result, out.removesuffix(".json") + ".png")
        print(markdown(result))
        return result

    from transformers import AutoTokenizer

    from dynsplit_sglang.default_model import smollm2_path, tiny_model_path

    info = run_info()  # the commit that runs, taken before anything can change

    if args.quick:
        model, lengths, fractions, samples, steps = tiny_model_path(), [512], [0.25], 2, 4
    else:
        model = smollm2_path()
        lengths = [int(x) for x in args.lengths.split(",")]
        fractions = [float(x) for x in args.fractions.split(",")]
        samples, steps = args.samples, args.decode_steps
    out = args.out or os.path.join(RESULTS, "passkey_quick.json" if args.quick else "passkey.json")
    partial = out.removesuffix(".json") + ".partial.jsonl"
    tok = AutoTokenizer.from_pretrained(model)
    data = {n: [make_sample(tok, n, seed) for seed in range(samples)] for n in lengths}

    # One engine per distinct budget; each serves every length whose fraction gives that budget.
    jobs: dict[tuple[str, int | None], list[tuple[int, float | None]]] = {("full", None): [(n, None) for n in lengths]}
    for n in lengths:
        for f in fractions:
            jobs.setdefault(("dynsplit", int(n * f)), []).append((n, f))

    done = {}
    if os.path.exists(partial):
        with open(partial) as fh:
            for line in fh:
                r = json.loads(line)
                done[(r["kv"], r["budget"], r["length"], r["seed"])] = r
    longest = max(lengths)
    timings = {}
    with open(partial, "a") as log:
        for (kv, budget), settings in jobs.items():
            todo = [(n, f, s) for n, f in settings for s in range(samples) if (kv, budget, n, s) not in done]
            time_it = any(n == longest for n, _ in settings) and (
                kv == "full" or budget == int(longest * min(fractions))
            )
            if not todo and not time_it:
                continue
            eng = engine(str(model), kv, budget)
            try:
                for n, f, seed in tqdm(todo, desc=f"{kv} budget={budget}", unit="prompt"):
                    sample = data[n][seed]
                    prompt = tok.apply_chat_template(sample.messages, add_generation_prompt=True, tokenize=False)
                    t = time.perf_counter()
                    text = eng.generate(prompt, {"temperature": 0, "max_new_tokens": 16})["text"]
                    r = {
                        "kv": kv,
                        "budget": budget,
                        "fraction": f,
                        "length": n,
                        "seed": seed,
                        "prompt_tokens": sample.num_tokens,
                        "depth": round(sample.depth, 3),
                        "answer": sample.answer,
                        "output": text,
                        "correct": is_correct(sample, text),
                        "seconds": round(time.perf_counter() - t, 2),
                    }
                    done[(kv, budget, n, seed)] = r
                    log.write(json.dumps(r) + "\n")
                    log.flush()
                if time_it:
                    prompt = tok.apply_chat_template(
                        data[longest][0].messages, add_generation_prompt=True, tokenize=False
                    )
                    timings[(kv, budget)] = decode_step_ms(eng, prompt, steps)
            finally:
                eng.shutdown()

    rows = []
    for (kv, budget), settings in jobs.items():
        for n, f in settings:
            rs = [done[(kv, budget, n, s)] for s in range(samples)]
            rows.append(
                {
                    "kv": kv,
                    "length": n,
                    "budget": budget if budget else n,
                    "fraction": f or 1.0,
                    "accuracy": sum(r["correct"] for r in rs) / len(rs),
                    "samples": len(rs),
                    "mean_prompt_tokens": round(sum(r["prompt_tokens"] for r in rs) / len(rs)),
                }
            )
    full_ms = timings.get(("full", None))
    speed = [
        {
            "kv": kv,
            "budget": b or longest,
            "length": longest,
            "decode_step_ms": round(ms, 2),
            "ratio_to_full": round(ms / full_ms, 3) if full_ms else None,
        }
        for (kv, b), ms in timings.items()
    ]
    result = {
        **info,
        "model": os.path.basename(str(model)),
        "dtype": "float32",
        "accuracy": rows,
        "decode_speed": speed,
        "samples": sorted(done.values(), key=lambda r: (r["kv"], r["budget"] or 0, r["length"], r["seed"])),
    }
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as fh:
        json.dump(result, fh, indent=1)
    plot(result, out.removesuffix(".json") + ".png")
    print(markdown(result))
    os.remove(partial)
    return result


def plot(result: dict, path: str) -> None:
    """Accuracy against KV budget (fraction of the prompt), one line per prompt length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    lengths = sorted({r["length"] for r in result["accuracy"]})
    for i, n in enumerate(lengths):
        rows = sorted((r for r in result["accuracy"] if r["length"] == n), key=lambda r: r["fraction"])
        ax.plot([r["fraction"] for r in rows], [r["accuracy"] for r in rows], "o-", color=f"C{i}", label=f"{n} tokens")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("KV budget / prompt length (1 = full attention)")
    ax.set_ylabel("passkey accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{result['model']}: --kv dynsplit vs full", fontsize=10)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(result: dict) -> str:
    lines = ["| policy | prompt tokens | KV budget | accuracy |", "| --- | --- | --- | --- |"]
    for r in result["accuracy"]:
        budget = "all" if r["kv"] == "full" else f"{r['budget']} (1/{round(1 / r['fraction'])})"
        lines.append(
            f"| {r['kv']} | {r['mean_prompt_tokens']} | {budget} | {r['accuracy']:.2f} ({r['samples']} samples) |"
        )
    lines += [
        "",
        "| policy | prompt tokens | KV budget | decode step (ms) | dynsplit / full |",
        "| --- | --- | --- | --- | --- |",
    ]
    for s in result["decode_speed"]:
        lines.append(f"| {s['kv']} | {s['length']} | {s['budget']} | {s['decode_step_ms']} | {s['ratio_to_full']} |")
    lines.append(f"\n{result['device']}; commit {result['commit']}; {result['date']}; `{result['command']}`")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
