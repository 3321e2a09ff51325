"""DynSplit-KV's options swept on development prompts and ranked against the shipped defaults.

    python -m benchmarks.accuracy.sweep                 # the default grid: seeds 1000-1019, 4k, a task per family
    python -m benchmarks.accuracy.sweep --grid "block_size=8,16 delta=2,4" --seeds 1000-1004
    python -m benchmarks.accuracy.sweep --rank          # the ranking of the saved sweep at --out
    python -m benchmarks.accuracy.sweep --validate C8-d2-la4    # fresh prompts: the suite's seeds 0-29, 2k-8k
    python -m benchmarks.accuracy.sweep --validate C8-d2-la4 --tasks all         # ... on every task
    python -m benchmarks.accuracy.sweep --speed         # decode speed of every configuration (4 x 7k, serve_bench)
    python -m benchmarks.accuracy.sweep --quick         # pipeline check on the tiny random model

A sweep is one run of the accuracy suite (`python -m benchmarks.accuracy`) in which every
configuration of the grid is a labelled `dynsplit` policy next to the shipped defaults (`dynsplit`)
and `full`: one engine serves them all (--kv-variants), so each prompt is prefilled once and every
configuration answers it at every budget. Its seeds (1000 and up) are not the suite's own (0-29),
so that choosing among configurations and validating the choice never see the same prompt.

A grid is `OPTION=v1,v2 OPTION=v1,v2 ...`: every combination of the values, the other options at
their defaults. Options joined by `+` vary together (`sink_tokens+recent_tokens=4+32,2+8`).
`score_layers` takes names as well as lists: `middle` (the default: 4 layers over the middle half),
`all` (every layer), `last_half`. `--grid` may be given more than once: the union of the grids.

The ranking (a table, `<out>_ranking.png`, and "ranking" in the result JSON): per configuration its
accuracy at each budget (the mean over tasks, each task weighted alike), their mean, the prompts
on which it beats or loses to the defaults (summed over budgets and lengths) with the sign test of
that split, and the tokens every decode step keeps whatever the scores (`always_kept`: sink, the
open block tail and the recent window; the part of a small budget that no selection can spend).
`--validate LABEL,...` then runs the suite on its own seeds with each candidate against the
defaults, `dynsplit-fixed` of the same block size and Quest with pages of that size. `--speed`
measures what each configuration costs: the speed benchmark's 4 x 7k load (`serve_bench --cpu`,
one server per configuration, `full` and the defaults in the same run); once that result exists
(`<out>_speed.json`) the ranking shows each configuration's decode speed against the defaults.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import subprocess
import sys

from benchmarks.accuracy.run import find_result, load_result, run_base, write_result
from benchmarks.common import RESULTS

DEFAULT_GRIDS = (
    # block length, how far a block end may move, and how many later queries score a boundary
    "block_size=8,12,16,24 delta=2,4 lookahead=4,8",
    # the fixed part of every step's budget, and which layers' attention decides the block ends
    "sink_tokens+recent_tokens=4+32,4+16,2+8 score_layers=middle,all,last_half",
    # the keys before a candidate that count neither as retained nor as distant past
    "local_window=8,32",
)
# one task per family of the suite (niah, multi-hop, aggregation, qa, code, records)
DEFAULT_TASKS = "niah_multikey,variable_tracking,frequent_words,qa_squad,code_return,records_table"
SHORT = {
    "block_size": "C",
    "delta": "d",
    "lookahead": "la",
    "local_window": "lw",
    "sink_tokens": "sink",
    "recent_tokens": "recent",
    "score_layers": "layers-",
    "alpha": "alpha",
}
LAYER_SETS = ("middle", "all", "last_half")
QUICK_GRID = "block_size=8,16 delta=2,4"
# the speed benchmark's CPU load (README: 4 requests of 7k tokens, budget 1024)
SPEED_ARGS = ("--cpu", "--kv-budget", "1024", "--settings", "7048x4", "--new-tokens", "48")
SPEED_ARGS += ("--max-total-tokens", "65536", "--compare", "dynsplit")


def compact(config: dict) -> str:
    """A configuration as the JSON a --kv entry carries (no spaces: one shell word)."""
    return json.dumps(config, separators=(",", ":"))


def parse_grid(text: str) -> list[dict]:
    """One `--grid`: every combination of its values, as option dicts (names as written)."""
    axes = []
    for part in text.split():
        names, sep, values = part.partition("=")
        if not sep or not names or not values:
            raise SystemExit(f"--grid: {part!r} is not OPTION=v1,v2,... (options joined by + vary together)")
        keys = names.split("+")
        axis = []
        for value in values.split(","):
            items = value.split("+")
            if len(items) != len(keys):
                raise SystemExit(f"--grid: {part!r}: the value {value!r} does not give one value to each of {keys}")
            axis.append(dict(zip(keys, (_value(k, v) for k, v in zip(keys, items)))))
        axes.append(axis)
    return [dict(kv for choice in combo for kv in choice.items()) for combo in itertools.product(*axes)]


def _value(key: str, text: str):
    if key == "score_layers" and text in LAYER_SETS:
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def layer_set(name: str, layers: int) -> list[int] | None:
    """A named set of score layers of a model with `layers` (compressed) layers; None: the default."""
    return {"middle": None, "all": list(range(layers)), "last_half": list(range(layers // 2, layers))}[name]


def configurations(grids: list[str], layers: int) -> list[tuple[str, dict]]:
    """(label, kv_config) of every distinct non-default configuration of the grids, checked by the
    policy's own option checks (a combination they refuse, e.g. Δ >= C, is left out, and said so)."""
    from dynsplit_sglang.config import KVConfigError
    from dynsplit_sglang.policies.dynsplit import DynSplitOptions

    defaults = DynSplitOptions()
    out, seen = [], set()
    for grid in grids:
        for names in parse_grid(grid):
            unknown = [k for k in names if k not in DynSplitOptions.help()]
            if unknown:
                raise SystemExit(f"--grid: {', '.join(unknown)} is not a dynsplit option")
            config = {}
            for key, value in names.items():
                if key == "score_layers" and isinstance(value, str):
                    value = layer_set(value, layers)
                if value != getattr(defaults, key) and not (key == "score_layers" and value is None):
                    config[key] = value
            key = json.dumps(config, sort_keys=True)
            if key in seen or not config:
                continue
            seen.add(key)
            try:
                DynSplitOptions.from_json(config)
            except KVConfigError as e:
                print(f"sweep: left out {names}: {e}", file=sys.stderr)
                continue
            out.append((label(names, config), config))
    return out


def label(names: dict, config: dict) -> str:
    """A short label naming the options that differ from the defaults, e.g. C8-d2-la4."""
    parts = []
    for key, value in names.items():
        if key not in config:
            continue
        shown = names[key] if key == "score_layers" and isinstance(names[key], str) else value
        shown = "x".join(map(str, shown)) if isinstance(shown, list) else shown
        parts.append(f"{SHORT.get(key, key + '-')}{shown}")
    return "-".join(parts)


def always_kept(config: dict) -> int:
    from dynsplit_sglang.policies.dynsplit import DynSplitOptions

    return DynSplitOptions.from_json(config).always_kept


def rank(result: dict, reference: str = "dynsplit") -> list[dict]:
    """One row per compressing policy of a sweep's result, best first (see the module docstring)."""
    from benchmarks.accuracy.report import paired, sign_test

    configs = {p["label"]: p["config"] for p in result["settings"]["policies"] if p["kv"] != "full"}
    cells: dict[str, dict] = {}
    for row in result["accuracy"]:
        if row["group"] == "all" and row["policy"] in configs:
            cells.setdefault(row["policy"], {}).setdefault(row["budget_setting"], []).append(row["accuracy"])
    pairs: dict[str, list[int]] = {}
    for p in paired(result["samples"], reference):
        counts = pairs.setdefault(p["policy"], [0, 0])
        counts[0] += p["worse"]  # the reference scores lower: the configuration wins
        counts[1] += p["better"]
    rows = []
    for name, by_budget in cells.items():
        accuracy = {str(b): round(sum(v) / len(v), 4) for b, v in by_budget.items()}  # mean over lengths
        wins, losses = pairs.get(name, [0, 0])
        rows.append(
            {
                "label": name,
                "config": configs[name],
                "always_kept": always_kept(configs[name]),
                "accuracy": accuracy,
                "mean": round(sum(accuracy.values()) / len(accuracy), 4),
                "wins": wins,
                "losses": losses,
                "p": 1.0 if name == reference else float(f"{sign_test(wins, losses):.3g}"),
            }
        )
    base = next((r["mean"] for r in rows if r["label"] == reference), None)
    for r in rows:
        r["vs_defaults"] = None if base is None else round(r["mean"] - base, 4)
    # on a tie the defaults rank first: a configuration has to beat them to be worth a change
    rows.sort(key=lambda r: (-r["mean"], r["losses"] - r["wins"], r["label"] != reference, r["label"]))
    for i, r in enumerate(rows, 1):
        r["rank"] = i
    return rows


def add_speed(rows: list[dict], speed: dict, reference: str = "dynsplit") -> None:
    """Each ranking row gets its decode step time from a `--speed` result (serve_bench JSON) and its
    speed against the defaults (> 1: faster)."""
    steps = {r["policy"]: r["decode_step_ms"] for r in speed["rows"] if r["decode_step_ms"]}
    for r in rows:
        r["decode_step_ms"] = steps.get(r["label"])
        base = steps.get(reference)
        r["speed_vs_defaults"] = round(base / r["decode_step_ms"], 3) if base and r["decode_step_ms"] else None


def ranking_markdown(rows: list[dict], reference: str = "dynsplit") -> str:
    budgets = list(rows[0]["accuracy"]) if rows else []
    speed = any(r.get("decode_step_ms") for r in rows)
    lines = [
        f"**configurations ranked by mean accuracy over budgets** (wins / losses: prompts on which it "
        f"scores higher / lower than `{reference}`, the shipped defaults; two-sided sign test)",
        "",
        "| rank | label | options | kept | "
        + " | ".join(f"budget {float(b):g}" for b in budgets)
        + " | mean | vs defaults | wins / losses | p |"
        + (" step ms | speed vs defaults |" if speed else ""),
        "| ---: | --- | --- | ---: |"
        + " ---: |" * len(budgets)
        + " ---: | ---: | --- | ---: |"
        + (" ---: | ---: |" if speed else ""),
    ]
    for r in rows:
        options = compact(r["config"]) if r["config"] else "(defaults)"
        vs = "" if r["vs_defaults"] is None or r["label"] == reference else f"{r['vs_defaults']:+.3f}"
        duel = "" if r["label"] == reference else f"{r['wins']} / {r['losses']}"
        p = "" if r["label"] == reference else f"{r['p']:.2g}"
        lines.append(
            f"| {r['rank']} | {r['label']} | `{options}` | {r['always_kept']} | "
            + " | ".join(f"{r['accuracy'].get(b, float('nan')):.3f}" for b in budgets)
            + f" | {r['mean']:.3f} | {vs} | {duel} | {p} |"
            + (f" {r.get('decode_step_ms') or '-'} | {r.get('speed_vs_defaults') or '-'} |" if speed else "")
        )
    return "\n".join(lines)


def plot_ranking(rows: list[dict], path: str, title: str, full: float | None, reference: str = "dynsplit") -> None:
    """Horizontal bars, best configuration on top: its accuracy at each budget; the defaults in
    bold, `full`'s accuracy (if the sweep ran it) as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = list(rows[0]["accuracy"])
    fig, ax = plt.subplots(figsize=(7.5, 0.28 * len(rows) + 1.4))
    height = 0.8 / len(budgets)
    for j, b in enumerate(budgets):
        ys = [len(rows) - 1 - i + (j - (len(budgets) - 1) / 2) * height for i in range(len(rows))]
        ax.barh(ys, [r["accuracy"].get(b, 0) for r in rows], height=height, color=f"C{j}", label=f"budget {float(b):g}")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([r["label"] + (" (defaults)" if r["label"] == reference else "") for r in reversed(rows)])
    for tick in ax.get_yticklabels():
        if tick.get_text().startswith(reference + " "):
            tick.set_fontweight("bold")
    ax.tick_params(labelsize=7)
    top = max([full or 0] + [a for r in rows for a in r["accuracy"].values()])
    ax.set_xlim(0, min(1.0, 1.15 * top) if top > 0 else 1.0)
    if full is not None:
        ax.axvline(full, color="k", ls="--", lw=1, label="full")
    ax.set_xlabel("accuracy (mean over tasks)", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def finish(result: dict, out: str, reference: str = "dynsplit") -> list[dict]:
    rows = rank(result, reference)
    if os.path.exists(speed := run_base(out) + "_speed.json"):
        with open(speed) as f:
            add_speed(rows, json.load(f), reference)
    result["ranking"] = rows
    write_result(result, out)
    lengths = ",".join(str(n) for n in result["settings"]["lengths"])
    seeds = result["settings"].get("seeds") or [0]
    full = [r["accuracy"] for r in result["accuracy"] if r["policy"] == "full" and r["group"] == "all"]
    plot_ranking(
        rows,
        run_base(out) + "_ranking.png",
        f"{result['model']}: dynsplit configurations, {lengths} tokens, "
        f"{len(result['settings']['tasks'])} tasks x seeds {seeds[0]}-{seeds[-1]}, commit {result['commit']}",
        sum(full) / len(full) if full else None,
        reference,
    )
    print(ranking_markdown(rows, reference))
    return rows


def validation_kv(candidates: list[tuple[str, dict]]) -> str:
    """The suite's --kv for a validation: full, the defaults and their fixed-interval and Quest
    twins, and each candidate with a fixed-interval split and a Quest of its own block size."""
    from dynsplit_sglang.policies.dynsplit import DynSplitOptions

    entries = ["full", "dynsplit", "dynsplit-fixed", "quest"]
    sizes = {DynSplitOptions().block_size}
    for name, config in candidates:
        entries.append(f"{name}=dynsplit{compact(config)}")
        size = config.get("block_size", DynSplitOptions().block_size)
        if size not in sizes:
            sizes.add(size)
            fixed = {"split": "fixed_interval", "block_size": size}
            entries.append(f"dynsplit-fixed-C{size}=dynsplit{compact(fixed)}")
            entries.append(f"quest-{size}=quest{compact({'page_size': size})}")
    return ",".join(entries)


def run_speed(candidates: list[tuple[str, dict]], out: str, model: str | None) -> int:
    """serve_bench on the speed benchmark's CPU load, one server per configuration (see SPEED_ARGS)."""
    from dynsplit_sglang.default_model import model_path

    kv = ",".join(["full", "dynsplit"] + [f"{n}=dynsplit{compact(c)}" for n, c in candidates])
    argv = ["-m", "benchmarks.serve_bench", *SPEED_ARGS, "--kv", kv, "--out", run_base(out) + "_speed.json"]
    if model:
        argv += ["--model-path", str(model_path(model))]
    print("sweep:", shlex.join(["python", *argv]), flush=True)
    return subprocess.run([sys.executable, *argv], check=True).returncode


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.accuracy.sweep", description=__doc__.splitlines()[0])
    p.add_argument("--grid", action="append", help="OPTION=v1,v2 ... (repeatable; default: the grids of DEFAULT_GRIDS)")
    p.add_argument("--seeds", default="1000-1019", help="development seeds (A-B or a list; not the suite's 0-29)")
    p.add_argument("--lengths", default="4096")
    p.add_argument("--budgets", default="0.125,0.0625")
    p.add_argument("--tasks", default=DEFAULT_TASKS, help="tasks, families or scenarios (default: one task per family)")
    p.add_argument("--model", default=None, help="smollm2 (default), gemma3, or a model folder")
    p.add_argument("--out", default=None, help="result path (default benchmarks/results/sweep_dynsplit[_quick])")
    p.add_argument("--rank", action="store_true", help="only rank the saved sweep at --out")
    p.add_argument(
        "--validate",
        metavar="LABEL,...",
        help="run the suite on its own seeds (--validation-samples, 2k-8k, the --tasks) with these "
        "configurations of the saved sweep against the defaults, dynsplit-fixed and Quest of the same block size",
    )
    p.add_argument("--validation-lengths", default="2048,4096,8192")
    p.add_argument("--validation-samples", type=int, default=30)
    p.add_argument(
        "--speed",
        nargs="?",
        const="all",
        metavar="LABEL,...",
        help="decode speed of the saved sweep's configurations (all, or these) on the speed benchmark's "
        "4 x 7k load, with full and the defaults: python -m benchmarks.serve_bench, written to <out>_speed.json",
    )
    p.add_argument("--quick", action="store_true", help="tiny random model, 512 tokens, 1 seed, 2 tasks, a small grid")
    return p.parse_args(argv)


def main(argv=None):
    from benchmarks.accuracy import __main__ as suite

    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    out = args.out or os.path.join(RESULTS, "sweep_dynsplit" + ("_quick" if args.quick else "") + ".json.gz")
    if args.rank or args.validate or args.speed:
        if (saved := find_result(out)) is None:
            raise SystemExit(f"python -m benchmarks.accuracy.sweep: error: no saved sweep at {out}; run it first")
        result = load_result(saved)
        if args.rank:
            return finish(result, out)
        configs = {p["label"]: p["config"] for p in result["settings"]["policies"] if p["kv"] == "dynsplit"}
        flag, names = ("--speed", args.speed) if args.speed else ("--validate", args.validate)
        chosen = [x for x in configs if x != "dynsplit"] if names == "all" else [x.strip() for x in names.split(",")]
        if args.validate and "dynsplit" in chosen:
            raise SystemExit(
                "--validate: dynsplit is the shipped defaults, which every validation runs; "
                "name configurations of the sweep to validate against them"
            )
        missing = [x for x in chosen if x not in configs]
        if missing or not chosen:
            known = ", ".join(configs)
            raise SystemExit(
                f"{flag}: {', '.join(missing) or 'nothing'} not in the sweep at {out}; its labels: {known}"
            )
        if args.speed:
            run_speed([(x, configs[x]) for x in chosen if x != "dynsplit"], out, args.model)
            return finish(result, out)  # the ranking again, now with each configuration's speed
        validation = run_base(out) + "_validation.json.gz"
        return suite.main(
            [
                "--kv",
                validation_kv([(x, configs[x]) for x in chosen]),
                "--lengths",
                args.validation_lengths,
                "--samples",
                str(args.validation_samples),
                "--budgets",
                args.budgets,
                "--tasks",
                args.tasks,
                "--paired-with",
                chosen[0],
                "--out",
                validation,
                *(["--model", args.model] if args.model else []),
            ]
        )

    from dynsplit_sglang.default_model import model_path, tiny_model_path
    from dynsplit_sglang.hybrid_layers import compressed_layers

    model = tiny_model_path() if args.quick else model_path(args.model)
    with open(os.path.join(model, "config.json")) as f:
        hf_config = json.load(f)
    hf_config = hf_config.get("text_config", hf_config)
    layers = len(compressed_layers(hf_config))
    grids = [QUICK_GRID] if args.quick and not args.grid else (args.grid or list(DEFAULT_GRIDS))
    configs = configurations(grids, layers)
    kv = ["full", "dynsplit"] + [f"{name}=dynsplit{compact(c)}" for name, c in configs]
    print(f"sweep: {len(configs)} configurations besides the defaults", flush=True)
    suite_argv = ["--kv", ",".join(kv), "--budgets", args.budgets, "--out", out]
    if args.quick:
        suite_argv += ["--quick", "--tasks", "niah_single,records_table"]
    else:
        suite_argv += ["--lengths", args.lengths, "--seeds", args.seeds, "--tasks", args.tasks]
        suite_argv += ["--model", args.model] if args.model else []
    result = suite.main(suite_argv)
    result["sweep_command"] = " ".join(shlex.quote(a) for a in ["python", "-m", "benchmarks.accuracy.sweep", *argv])
    return finish(result, out)


if __name__ == "__main__":
    main()
