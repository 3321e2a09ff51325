"""The KV policies a run compares, and the `sgl.Engine` arguments that start each of them.

`--kv` takes a comma-separated list; each entry is one of

    full | dynsplit | quest | ...      a `--kv` policy with its defaults
    POLICY{"key": value, ...}          that policy with options (passed as `kv_config`), as
                                       in serve_bench's --kv; POLICY:{...} means the same
    LABEL=POLICY{...}                  the same, named LABEL in tables and plots
    dynsplit-fixed | dynsplit-punct | dynsplit-type
                                       the split-rule ablation variants (`VARIANTS`; `dynsplit`
                                       itself is DD-Select with per-position weighting)

The ablation varies only DynSplit-KV's split rule; block size, Δ, budget and everything else
stay at the same values, so all four split rules aim at the same block length C. Only the rigid
rule always cuts exactly C tokens; the delimiter rules cut anywhere in C±Δ, and their mean depends
on where the delimiters fall (`python -m benchmarks.accuracy.blocks --samples N` prints it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from dynsplit_sglang.config import parse_json_object


@dataclass(frozen=True)
class Policy:
    """One compared setting.

    label:  its name in records, tables and plots.
    kv:     the `--kv` policy ("full" is SGLang's own dense attention, the reference).
    config: policy options, given to the engine as `kv_config` ({} = the policy's defaults).
    """

    label: str
    kv: str
    config: dict = field(default_factory=dict)

    @property
    def dense(self) -> bool:
        return self.kv == "full"

    def with_options(self, options: dict) -> Policy:
        """Run-wide `--kv-config` options under this policy's own (its own win); none for full."""
        return self if self.dense or not options else Policy(self.label, self.kv, {**options, **self.config})


VARIANTS = {
    # rigid fixed-interval blocks of C tokens (Quest/ChunkKV-style)
    "dynsplit-fixed": Policy("dynsplit-fixed", "dynsplit", {"split": "fixed_interval"}),
    # a pre-defined delimiter set: blocks end at punctuation, whatever its score (SepLLM/SentenceKV-style)
    "dynsplit-punct": Policy("dynsplit-punct", "dynsplit", {"split": "punctuation"}),
    # DD-Select, each delimiter type weighted by the mean score of its occurrences
    "dynsplit-type": Policy("dynsplit-type", "dynsplit", {"split": "dd_select", "weighting": "delimiter_type"}),
}
# The split-rule ablation's rows; plain `dynsplit` is DD-Select with each candidate position
# weighted by its own score (the paper's formula, the default).
ABLATION = ("full", "dynsplit-fixed", "dynsplit-punct", "dynsplit", "dynsplit-type")


def split_top_level(text: str) -> list[str]:
    """Split on commas outside braces and brackets, so JSON options may contain commas."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def parse_policy(entry: str) -> Policy:
    """One `--kv` entry (see the module docstring)."""
    if entry in VARIANTS:
        return VARIANTS[entry]
    label = None
    if "=" in entry.split("{", 1)[0].split(":", 1)[0]:
        label, entry = entry.split("=", 1)
    if "{" in entry:  # POLICY{...} (serve_bench's form) or POLICY:{...}
        kv, options = entry[: entry.index("{")].removesuffix(":"), entry[entry.index("{") :]
    else:
        kv, _, options = entry.partition(":")
    config = parse_json_object(options, f"the options of --kv entry {entry!r}")
    if kv == "full" and config:
        raise ValueError("--kv full takes no options")
    if not kv:
        raise ValueError(f"--kv entry {entry!r} names no policy")
    default = kv if not config else f"{kv}:{json.dumps(config, sort_keys=True, separators=(',', ':'))}"
    return Policy(label or default, kv, config)


def parse_policies(text: str, options: dict | None = None) -> list[Policy]:
    """The `--kv` list, with the run-wide `--kv-config` options applied."""
    policies = [parse_policy(e).with_options(options or {}) for e in split_top_level(text)]
    labels = [p.label for p in policies]
    if len(set(labels)) != len(labels):
        raise ValueError(f"--kv: two entries have the same label ({', '.join(labels)})")
    return policies


def policy_engine_kwargs(policy: Policy, kv_budget: int | None) -> dict:
    """The KV arguments of an engine that runs one policy (`full`: SGLang's own attention)."""
    if policy.dense:
        return {}
    kwargs = dict(kv=policy.kv, kv_budget=kv_budget)
    if policy.config:
        kwargs["kv_config"] = policy.config
    return kwargs


def shared_engine(policies: list[Policy], kv_budget: int) -> tuple[dict, dict[str, str]]:
    """The KV arguments of one engine that runs every (compressing) policy, and the server label
    that each policy's requests name (custom_params kv_policy). The --kv policy is one whose label
    is its policy name, if any, so that no variant's label clashes with it; the others run as
    --kv-variants under their labels."""
    main = next((p for p in policies if p.label == p.kv), policies[0])
    kwargs = policy_engine_kwargs(main, kv_budget)
    variants = {p.label: {"policy": p.kv, **p.config} for p in policies if p is not main}
    if variants:
        kwargs["kv_variants"] = variants
    return kwargs, {p.label: (main.kv if p is main else p.label) for p in policies}


def engine_args(kv_kwargs: dict, model_path: str, max_total_tokens: int, device: str) -> dict:
    """Keyword arguments of `sgl.Engine` (the radix cache stays on: requests with the same prompt
    share its prefill); no KV arguments means `--kv full` (torch_native attention on the CPU)."""
    args = dict(
        model_path=str(model_path),
        device=device,
        dtype="float32" if device == "cpu" else "bfloat16",
        max_total_tokens=max_total_tokens,
        skip_server_warmup=True,
        disable_overlap_schedule=True,
        log_level="error",
        **kv_kwargs,
    )
    if not kv_kwargs and device == "cpu":
        args["attention_backend"] = "torch_native"
    return args
