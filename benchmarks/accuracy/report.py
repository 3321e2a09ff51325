"""From per-sample records to accuracy rows, a markdown table and a plot.

A record is one generation: policy, task, family, scenario, length, seed, budget (KV tokens; the
prompt length for `full`), fraction (budget / length), answers, output and score. A row is the
mean score of the records of one (policy, length, budget, group), where the group is a task
family, a scenario, a task, or "all" (the mean over tasks, each task weighted alike). `paired`
compares DynSplit-KV with each other policy prompt by prompt.
"""

from __future__ import annotations

import math
from collections import defaultdict

GROUPS = ("family", "scenario", "task")


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def aggregate(records: list[dict]) -> list[dict]:
    """Accuracy rows for every grouping in GROUPS plus "all", sorted for reading."""
    cells: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        setting = (r["policy"], r["length"], r["budget_setting"])
        for group in GROUPS:
            cells[(*setting, group, r[group])].append(r)
        cells[(*setting, "all", "all")].append(r)
    rows = []
    for (policy, length, setting, group, name), rs in cells.items():
        by_task: dict[str, list[float]] = defaultdict(list)
        for r in rs:
            by_task[r["task"]].append(r["score"])
        rows.append(
            {
                "policy": policy,
                "length": length,
                "budget_setting": setting,
                "budget": round(_mean(r["budget"] for r in rs)),
                "fraction": round(_mean(r["fraction"] for r in rs), 4),
                "group": group,
                "name": name,
                "accuracy": round(_mean(_mean(s) for s in by_task.values()), 4),
                "samples": len(rs),
                "mean_prompt_tokens": round(_mean(r["prompt_tokens"] for r in rs)),
            }
        )
    order = {p: i for i, p in enumerate(dict.fromkeys(r["policy"] for r in records))}
    rows.sort(key=lambda r: (r["group"], r["length"], order[r["policy"]], -r["fraction"], r["name"]))
    return rows


TITLES = {"family": "KV policies by task family", "scenario": "split rules by scenario", "task": "by task"}


def _shown(rows: list[dict], policies) -> list[dict]:
    """The rows of `policies` (all if None), in that order."""
    if policies is None:
        return rows
    order = {p: i for i, p in enumerate(policies)}
    return sorted((r for r in rows if r["policy"] in order), key=lambda r: order[r["policy"]])


def markdown(result: dict, group: str, policies: list[str] | None = None) -> str:
    """One table per length: a row per (policy, budget), a column per `group` value plus "all";
    only `policies` (in that order) if given."""
    rows = _shown([r for r in result["accuracy"] if r["group"] in (group, "all")], policies)
    names = sorted({r["name"] for r in rows if r["group"] == group})
    out = []
    for length in sorted({r["length"] for r in rows}):
        cell = {(r["policy"], r["budget_setting"], r["name"]): r for r in rows if r["length"] == length}
        settings = list(
            dict.fromkeys(
                (r["policy"], r["budget_setting"]) for r in rows if r["length"] == length and r["group"] == "all"
            )
        )
        prompt = round(_mean(r["mean_prompt_tokens"] for r in rows if r["length"] == length and r["group"] == "all"))
        out += [
            f"**{TITLES[group]}, {length} tokens** (prompts {prompt} tokens on average; accuracy, mean over samples)",
            "",
            "| policy | KV budget | " + " | ".join(names) + " | all |",
            "| --- | --- |" + " --- |" * (len(names) + 1),
        ]
        for policy, setting in settings:
            first = cell[(policy, setting, "all")]
            budget = "all" if setting is None else f"{first['budget']} ({first['fraction']:.3g})"
            values = [cell.get((policy, setting, n)) for n in names + ["all"]]
            out.append(
                f"| {policy} | {budget} | "
                + " | ".join("-" if v is None else f"{v['accuracy']:.2f}" for v in values)
                + " |"
            )
        n = max(r["samples"] for r in rows if r["length"] == length and r["group"] == group)
        out += ["", f"Up to {n} samples per cell."] if n else []
        out.append("")
    out.append(
        f"{result['model']}; {result['device']}; commit {result['commit']}; {result['date']}; `{result['command']}`"
    )
    return "\n".join(out)


def budget_name(setting) -> str:
    """A budget setting as a column header: "1/8" for 0.125, "0.3" for 0.3, "512 tokens" for 512."""
    if setting > 1:
        return f"{setting:g} tokens"
    inverse = 1 / setting
    return f"1/{round(inverse)}" if abs(inverse - round(inverse)) < 1e-6 else f"{setting:g}"


def summary_markdown(result: dict, policies: list[str] | None = None) -> str:
    """One table for a whole run: a row per policy, a column per budget setting. A cell is the
    accuracy over every task (each task weighted alike, the "all" rows) at each length, averaged
    over the lengths (each length alike). A dense policy (`full`) has one value per length; its row
    repeats it in every column. A cell that lacks a length (an unfinished run) is marked *."""
    rows = _shown([r for r in result["accuracy"] if r["group"] == "all"], policies)
    lengths = sorted({r["length"] for r in rows})
    settings = sorted({r["budget_setting"] for r in rows if r["budget_setting"] is not None}, key=lambda b: (b > 1, -b))
    tasks = sorted({r["name"] for r in result["accuracy"] if r["group"] == "task"})
    samples = max((r["samples"] for r in result["accuracy"] if r["group"] == "task"), default=0)
    out = [
        f"**Accuracy per policy and KV budget** ({result['model']}; the mean over {len(tasks)} tasks at each "
        f"length, then over the lengths {', '.join(map(str, lengths))} tokens; budget as a fraction of the length; "
        f"up to {samples} prompts per task and length)",
        "",
        "| policy | " + " | ".join(f"budget {budget_name(b)}" for b in settings) + " |",
        "| --- |" + " --- |" * len(settings),
    ]
    marked = False
    for policy in dict.fromkeys(r["policy"] for r in rows):
        mine = [r for r in rows if r["policy"] == policy]
        dense = all(r["budget_setting"] is None for r in mine)
        cells = []
        for b in settings:
            values = [r["accuracy"] for r in mine if r["budget_setting"] == (None if dense else b)]
            short = len(values) < len(lengths)
            marked |= bool(values) and short
            cells.append("-" if not values else f"{_mean(values):.2f}" + ("*" if short else ""))
        out.append(f"| {policy}{' (every token)' if dense else ''} | " + " | ".join(cells) + " |")
    if marked:
        out += ["", "\\* not every length answered yet: the mean of those that are."]
    return "\n".join(out)


def sign_test(better: int, worse: int) -> float:
    """Two-sided exact sign test: the chance of a split at least this uneven between `better` and
    `worse` if either were equally likely (ties left out)."""
    n, k = better + worse, min(better, worse)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def paired(records: list[dict], reference: str = "dynsplit") -> list[dict]:
    """`reference` against every other policy, prompt by prompt: at each length and budget, on how
    many prompts its score is higher, lower or the same, and the sign test of that split. A dense
    policy (`full`) is compared at each of the reference's budgets. Only prompts both answered count.

    Means over 30 samples per task move by 0.03 with one answer; this says which gaps are more
    than that."""
    scores: dict[tuple, dict] = defaultdict(dict)  # (task, length, seed) -> {(policy, setting): score}
    for r in records:
        scores[(r["task"], r["length"], r["seed"])][(r["policy"], r["budget_setting"])] = r["score"]
    policies = [p for p in dict.fromkeys(r["policy"] for r in records) if p != reference]
    dense = {r["policy"] for r in records if r["budget_setting"] is None}
    settings = sorted(
        {
            (r["length"], r["budget_setting"])
            for r in records
            if r["policy"] == reference and r["budget_setting"] is not None
        },
        key=lambda x: (x[0], -x[1]),
    )
    rows = []
    for length, setting in settings:
        for policy in policies:
            other = (policy, None if policy in dense else setting)
            pairs = [
                (s[(reference, setting)], s[other])
                for (_, n, _), s in scores.items()
                if n == length and (reference, setting) in s and other in s
            ]
            if not pairs:
                continue
            better, worse = sum(a > b for a, b in pairs), sum(a < b for a, b in pairs)
            rows.append(
                {
                    "reference": reference,
                    "policy": policy,
                    "length": length,
                    "budget_setting": setting,
                    "prompts": len(pairs),
                    "better": better,
                    "worse": worse,
                    "ties": len(pairs) - better - worse,
                    "p": float(f"{sign_test(better, worse):.3g}"),
                }
            )
    return rows


def _p(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p {p:.2g}"


def paired_markdown(rows: list[dict]) -> str:
    """One table per length: a row per policy, a column per budget: `better / worse (p)`."""
    out = []
    for length in sorted({r["length"] for r in rows}):
        at = [r for r in rows if r["length"] == length]
        ref, settings = at[0]["reference"], list(dict.fromkeys(r["budget_setting"] for r in at))
        cell = {(r["policy"], r["budget_setting"]): r for r in at}
        out += [
            f"**{ref} against each policy, prompt by prompt, {length} tokens** (prompts where {ref} "
            f"scores higher / lower; two-sided sign test p, ties left out)",
            "",
            "| policy | " + " | ".join(f"budget {s:g}" for s in settings) + " |",
            "| --- |" + " --- |" * len(settings),
        ]
        for policy in dict.fromkeys(r["policy"] for r in at):
            values = [cell.get((policy, s)) for s in settings]
            out.append(
                f"| {policy} | "
                + " | ".join("-" if v is None else f"{v['better']} / {v['worse']} ({_p(v['p'])})" for v in values)
                + " |"
            )
        out.append("")
    return "\n".join(out)


def plot(result: dict, path: str, group: str, policies: list[str] | None = None) -> None:
    """Accuracy against KV budget (fraction of the length), a line per policy (only `policies` if
    given); a panel per `group` value (columns) and length (rows); `full` as a dashed reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _shown([r for r in result["accuracy"] if r["group"] == group], policies)
    names = sorted({r["name"] for r in rows})
    lengths = sorted({r["length"] for r in rows})
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    colors = {p: f"C{i}" for i, p in enumerate(policies)}
    fig, axes = plt.subplots(
        len(lengths),
        len(names),
        figsize=(2.6 * len(names) + 0.6, 2.3 * len(lengths) + 0.8),
        squeeze=False,
        sharex=True,
        sharey=True,
    )
    fractions = sorted({r["fraction"] for r in rows if r["budget_setting"] is not None})
    for i, length in enumerate(lengths):
        for j, name in enumerate(names):
            ax = axes[i][j]
            for policy in policies:
                pts = sorted(
                    (r["fraction"], r["accuracy"])
                    for r in rows
                    if r["policy"] == policy and r["length"] == length and r["name"] == name
                )
                if not pts:
                    continue
                if all(r["budget_setting"] is None for r in rows if r["policy"] == policy):
                    ax.axhline(pts[0][1], color=colors[policy], ls="--", lw=1.2, label=policy)
                else:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=3, color=colors[policy], label=policy)
            ax.set_ylim(-0.03, 1.03)
            ax.grid(alpha=0.3)
            if fractions:
                ax.set_xscale("log", base=2)
            if i == 0:
                ax.set_title(name, fontsize=9)
            if j == 0:
                ax.set_ylabel(f"{length} tokens\naccuracy", fontsize=8)
            if i == len(lengths) - 1:
                ax.set_xlabel("KV budget / length", fontsize=8)
            ax.tick_params(labelsize=7)
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes.flat:  # a policy missing from the first panel still gets a legend entry
        for h, l in zip(*ax.get_legend_handles_labels()):
            if l not in labels:
                handles.append(h)
                labels.append(l)
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8, frameon=False)
    fig.suptitle(f"{result['model']}: {TITLES[group]}", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
