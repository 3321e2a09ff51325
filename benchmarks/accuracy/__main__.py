"""Offline long-context accuracy suite: every KV policy at every budget, scored, tabled, plotted.

    python -m benchmarks.accuracy                       # every policy and rule, budgets 1/4-1/16, 2k-8k, 30 samples
    python -m benchmarks.accuracy --kv full,dynsplit,snapkv --lengths 2048 --samples 5 --tasks niah
    python -m benchmarks.accuracy --ablation            # only DynSplit-KV's split rules, on 6 tasks
    python -m benchmarks.accuracy --quick               # pipeline check on the tiny random model
    python -m benchmarks.accuracy --replot [--out X.json.gz]
    python -m benchmarks.accuracy --progress [--tasks niah_single]   # the tables of the saved answers
    python -m benchmarks.accuracy --summary     # one table: accuracy per policy and budget
    python -m benchmarks.accuracy.sweep         # DynSplit-KV's options on development seeds (sweep.py)

Runs SGLang in process on the embedded SmolLM2-135M-Instruct (or --model), greedy, chat template
applied; by default one engine runs every policy (--kv-variants) and each prompt is prefilled
once. The default run also answers with DynSplit-KV's other split rules (the ablation rides on
the same prefills). Prints the policy table (by task family) and the split-rule table (by
scenario) per length and writes gzipped JSON (commit, device, date, exact command, model,
per-sample records, accuracy rows; benchmarks/results/accuracy.json.gz) and a PNG plot per table
under benchmarks/results/. Every answer is saved to <out>.partial.jsonl at once; rerunning the
same command resumes. --progress, --summary and --replot read a finished run from X.json.gz, or
from the plain X.json of a run saved before results were gzipped.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

from benchmarks.accuracy.policies import ABLATION, VARIANTS, parse_policies
from benchmarks.accuracy.run import ENGINES, find_result, load_result, run_base, saved_records, write_result
from benchmarks.common import RESULTS, run_info
from dynsplit_sglang.config import parse_json_object
from dynsplit_sglang.policies import POLICIES

ABLATION_TASKS = ("niah_single", "niah_multikey", "qa_squad", "code_return", "records_jsonl", "records_table")
QUICK = dict(
    lengths=[512],
    samples=1,
    tasks=["niah_single", "code_return", "records_table"],
    kv="full,dynsplit,snapkv,dynsplit-fixed,dynsplit-punct,dynsplit-type",
    budgets=[0.25],
)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.accuracy", description=__doc__.splitlines()[0])
    p.add_argument(
        "--kv",
        default=None,
        help="comma-separated policies: NAME, NAME{json options}, LABEL=NAME{...} (NAME:{...} too), "
        "or a split-rule variant (dynsplit-fixed, dynsplit-punct, dynsplit-type); default: every policy and split rule",
    )
    p.add_argument(
        "--kv-config", default=None, help="JSON options given to every compressing policy (its own options win)"
    )
    p.add_argument(
        "--budgets", default="0.25,0.125,0.0625", help="KV budgets: <= 1 a fraction of the length, > 1 tokens"
    )
    p.add_argument("--lengths", default="2048,4096,8192", help="length settings in tokens (prompt + answer)")
    p.add_argument("--samples", type=int, default=30, help="prompts per task and length (seeds 0..N-1)")
    p.add_argument(
        "--seeds",
        default=None,
        help="the prompts' seeds instead of 0..N-1: A-B (inclusive) or a comma-separated list; "
        "e.g. 1000-1019 for development prompts that a validation on the suite's own 0..29 never sees",
    )
    p.add_argument("--tasks", default=None, help="'all', or task / family / scenario names, comma-separated")
    p.add_argument(
        "--ablation",
        action="store_true",
        help="only full + dynsplit's four split rules on the "
        "prose/code/records tasks, reported per scenario (the default run includes them on every task)",
    )
    p.add_argument(
        "--engines",
        choices=ENGINES,
        default="shared",
        help="shared: one engine runs every policy, "
        "each request names its policy and budget, so a prompt is prefilled once; policy: one engine per "
        "policy; budget: one per policy and budget",
    )
    p.add_argument("--model", default=None, help="smollm2 (default), gemma3 (the embedded models), or a model folder")
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny random model, 512 tokens, 1 sample of 3 tasks, full + "
        "dynsplit, snapkv and the split rules at 1/4 in one shared engine: checks the pipeline and the "
        "scorer, not accuracy",
    )
    p.add_argument(
        "--out",
        default=None,
        help="result path, X.json.gz (X or X.json name the same run; it is "
        "always written gzipped, and read from X.json.gz, else an older plain X.json); default "
        "benchmarks/results/accuracy[_ablation][_quick].json.gz",
    )
    p.add_argument(
        "--paired-with",
        default="dynsplit",
        metavar="LABEL",
        help="the policy the prompt-by-prompt comparison holds every other one against",
    )
    p.add_argument("--replot", action="store_true", help="only redraw the plot and table from the result at --out")
    p.add_argument(
        "--progress",
        action="store_true",
        help="only print the tables of the saved answers: an unfinished "
        "run's so far (marked partial), else the finished run's JSON at --out; writes nothing; with --tasks, "
        "of those tasks only",
    )
    p.add_argument(
        "--summary",
        action="store_true",
        help="like --progress, but one table: accuracy per policy and "
        "budget, the mean over tasks and then over lengths",
    )
    return p.parse_args(argv)


def select_tasks(text: str | None, default) -> list[str]:
    from benchmarks.accuracy.tasks import TASKS

    if text is None:
        return list(default)
    if text == "all":
        return list(TASKS)
    chosen = []
    for name in text.split(","):
        found = [t.name for t in TASKS.values() if name in (t.name, t.family, t.scenario)]
        if not found:
            raise SystemExit(f"--tasks: unknown task, family or scenario {name!r}; tasks: {', '.join(TASKS)}")
        chosen += [t for t in found if t not in chosen]
    return chosen


def parse_seeds(text: str) -> list[int]:
    """`--seeds`: "A-B" (both ends included) or "a,b,c"; distinct non-negative integers."""
    try:
        if "-" in text:
            lo, hi = (int(x) for x in text.split("-"))
            seeds = list(range(lo, hi + 1))
        else:
            seeds = [int(x) for x in text.split(",")]
    except ValueError:
        raise SystemExit(f"--seeds: {text!r} is neither A-B nor a comma-separated list of integers") from None
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise SystemExit(f"--seeds: {text!r} must name at least one seed, none negative or repeated")
    return seeds


def parse_budgets(text: str) -> tuple[float, ...]:
    values = []
    for x in text.split(","):
        v = float(x)
        if v <= 0 or (v > 1 and not v.is_integer()):
            raise SystemExit(f"--budgets: {x!r} is neither a fraction in (0, 1] nor a whole number of tokens")
        values.append(int(v) if v > 1 else v)
    return tuple(values)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    group = "scenario" if args.ablation else "family"
    name = "accuracy" + ("_ablation" if args.ablation else "") + ("_quick" if args.quick else "")
    out = args.out or os.path.join(RESULTS, name + ".json.gz")
    if args.replot:
        if (saved := find_result(out)) is None:
            raise SystemExit(f"python -m benchmarks.accuracy: error: no saved result for {out}")
        return finish(load_result(saved), out, write=False, reference=args.paired_with)
    if args.progress or args.summary:
        tasks = None if args.tasks is None else select_tasks(args.tasks, ())
        return progress(
            run_base(out) + ".partial.jsonl",
            group,
            tasks,
            finished=find_result(out),
            summary=args.summary,
            reference=args.paired_with,
        )

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from benchmarks.accuracy.report import aggregate
    from benchmarks.accuracy.run import Settings, load_partial, pending, record_key, run
    from benchmarks.accuracy.scoring import check
    from benchmarks.accuracy.tasks import TASKS, make_sample
    from dynsplit_sglang.default_model import model_path, tiny_model_path

    info = run_info()  # the commit that runs, taken before anything can change
    info["command"] = " ".join(shlex.quote(a) for a in ["python", "-m", "benchmarks.accuracy", *argv])
    if args.quick:
        model, lengths, seeds, budgets = tiny_model_path(), QUICK["lengths"], range(QUICK["samples"]), QUICK["budgets"]
        tasks, kv = select_tasks(args.tasks, QUICK["tasks"]), args.kv or QUICK["kv"]
    else:
        model = model_path(args.model)
        lengths = [int(x) for x in args.lengths.split(",")]
        seeds = parse_seeds(args.seeds) if args.seeds else range(args.samples)
        budgets = parse_budgets(args.budgets)
        tasks = select_tasks(args.tasks, ABLATION_TASKS if args.ablation else TASKS)
        kv = args.kv or ",".join(ABLATION if args.ablation else (*POLICIES, *VARIANTS))
    try:
        policies = parse_policies(kv, parse_json_object(args.kv_config))
    except ValueError as e:  # a malformed --kv or --kv-config: one line, no traceback
        raise SystemExit(f"python -m benchmarks.accuracy: error: {e}") from None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    settings = Settings(str(model), tuple(budgets), device, args.engines)
    tokenizer = AutoTokenizer.from_pretrained(str(model))

    prompts = [(t, n, s) for n in lengths for t in tasks for s in seeds]
    data = [make_sample(tokenizer, t, n, s) for t, n, s in tqdm(prompts, desc="prompts", unit="prompt", leave=False)]
    for sample in data:
        check(sample)  # the scorer gives 1 to the gold answers and 0 to an empty answer, on every prompt
    max_new = max(s.max_new_tokens for s in data)
    per_prompt = sum(1 if p.dense else len(budgets) for p in policies)
    # one prompt's KV, plus each request's answer and the prompt tail a radix hit recomputes; x2 margin
    max_total_tokens = 2 * (max(lengths) + per_prompt * (max_new + 64))

    partial = run_base(out) + ".partial.jsonl"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    model_name = os.path.basename(str(model))
    done = load_partial(partial, model_name)
    work = pending(policies, data, settings, done)
    total = len(data) * per_prompt
    left = sum(len(items) for _, items in work)
    with (
        open(partial, "a") as log,
        tqdm(total=total, initial=total - left, desc="answers", unit="answer", smoothing=0) as bar,
    ):

        def on_record(r: dict) -> None:
            r["commit"] = info["commit"]  # a resumed run may continue at a later commit
            log.write(json.dumps(r) + "\n")
            log.flush()
            done[record_key(r["policy"], r["config"], r["task"], r["length"], r["seed"], r["budget_setting"])] = r
            bar.update()

        def on_engine(kv_kwargs: dict) -> None:
            bar.set_postfix_str(
                kv_kwargs.get("kv", "full")
                + (f" + {len(kv_kwargs['kv_variants'])} variants" if "kv_variants" in kv_kwargs else "")
            )

        if work:
            run(policies, work, settings, tokenizer, max_total_tokens, on_record, on_engine)

    records = [
        done[record_key(p.label, p.config, s.task, s.length, s.seed, b)]
        for p in policies
        for s in data
        for b in ([None] if p.dense else budgets)
    ]
    # the commits the answers were generated at (more than one when a run was resumed after a change)
    info["answer_commits"] = sorted({r.get("commit", info["commit"]) for r in records})
    result = {
        **info,
        "model": model_name,
        "dtype": "float32" if device == "cpu" else "bfloat16",
        "settings": {
            "policies": [vars(p) for p in policies],
            "budgets": list(budgets),
            "lengths": lengths,
            "samples": len(seeds),
            "seeds": list(seeds),
            "tasks": tasks,
            "group": group,
            "engines": args.engines,
        },
        "accuracy": aggregate(records),
        "samples": records,
    }
    finish(result, out, reference=args.paired_with)
    os.remove(partial)
    return result


def views(labels: list[str], group: str) -> list[tuple[str, list[str], str]]:
    """The tables of a run: (plot file suffix, policy labels in it, grouping). A run grouped by
    family shows its policies, and the split-rule ablation per scenario if all its rows ran (then
    the split-rule variants appear there only; a run without the whole ablation keeps them in the
    policy table, where they are the only place they show)."""
    if group == "scenario":
        return [("", labels, group)]
    if not all(p in labels for p in ABLATION):
        return [("", labels, group)]
    return [("", [p for p in labels if p not in VARIANTS], group), ("_split_rule", list(ABLATION), "scenario")]


def progress(
    partial: str,
    group: str,
    tasks: list[str] | None = None,
    finished: str | None = None,
    summary: bool = False,
    reference: str = "dynsplit",
) -> list[dict]:
    """Print the tables of the answers an unfinished run has saved (not a result: cells hold
    whatever samples are done, so they are not comparable until the run ends), or, when there is
    no progress file, those of the finished run's result file `finished` (.json.gz or .json); with
    `tasks`, of those tasks' answers only (`--progress --tasks niah_single`: one task's
    prompt-by-prompt table); with `summary`, only the one table of accuracy per policy and budget."""
    from benchmarks.accuracy.report import aggregate, markdown, paired, paired_markdown, summary_markdown

    records, source = saved_records(partial), partial
    if not records and finished and os.path.exists(finished):
        records, source = load_result(finished)["samples"], finished
    records = [r for r in records if tasks is None or r["task"] in tasks]
    if not records:
        print(f"no saved answers in {partial}" + (f" or {finished}" if finished else ""))
        return records
    commits = sorted({r.get("commit", "unknown") for r in records})
    prompts = len({(r["task"], r["length"], r["seed"]) for r in records})
    if source == partial:
        print(f"PARTIAL: {len(records)} answers for {prompts} prompts in {_shown_path(partial)} (not a result)\n")
    else:
        print(f"{len(records)} answers for {prompts} prompts in {_shown_path(finished)} (the finished run)\n")
    result = {
        "accuracy": aggregate(records),
        "model": records[0]["model"],
        "device": "unfinished run" if source == partial else "saved run",
        "commit": ", ".join(commits),
        "date": "-",
        "command": "--progress",
    }
    if summary:
        print(summary_markdown(result))
        return records
    for _, labels, by in views(list(dict.fromkeys(r["policy"] for r in records)), group):
        print(markdown(result, by, labels) + "\n")
    if rows := paired(records, reference):
        print(paired_markdown(rows))
    return records


def _shown_path(path: str) -> str:
    """`path` relative to the working directory if it lies below it (as a user typed it), else as it is."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def finish(result: dict, out: str, write: bool = True, reference: str = "dynsplit") -> dict:
    from benchmarks.accuracy.report import markdown, paired, paired_markdown, plot

    result["paired"] = paired(result["samples"], reference)
    if write:
        write_result(result, out)
    labels = [p["label"] for p in result["settings"]["policies"]]
    for suffix, shown, group in views(labels, result["settings"]["group"]):
        plot(result, run_base(out) + suffix + ".png", group, shown)
        print(markdown(result, group, shown) + "\n")
    if result["paired"]:
        print(paired_markdown(result["paired"]))
    return result


if __name__ == "__main__":
    main()
