"""Configuration of the KV policies: what `--kv`, `--kv-budget` and `--kv-config` mean.

One frozen dataclass of options per policy, validated once at startup. Every error is a
`KVConfigError` whose message names the flag, the bad value and the valid choices, so the CLI can
print it as one line.

The budget means the same for every policy: the KV tokens one request attends to per decode step
in a layer (per KV head), sink and recent tokens included. Policies with per-layer budgets
(PyramidKV, DynamicKV, WindowKV, `dynsplit` with `layer_budgets: dynamickv`) keep the sum over
layers at `num_layers * budget`, so the budget is the per-layer mean.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

DEFAULT_BUDGET = 2048
CANDIDATE_MODES = ("delimiters", "all")
SPLIT_RULES = ("dd_select", "fixed_interval", "punctuation")
WEIGHTINGS = ("position", "delimiter_type")
LAYER_BUDGETS = ("uniform", "dynamickv")
POOLINGS = ("avg", "max")
WINDOW_RULES = ("auto", "max", "mean")


class KVConfigError(ValueError):
    """A wrong `--kv*` value; the message is a complete, user-facing sentence."""


def _check_int(name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise KVConfigError(f"--kv-config: '{name}' must be an integer >= {minimum}, got {value!r}")


def _check_number(name: str, value, minimum: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < minimum:
        raise KVConfigError(f"--kv-config: '{name}' must be a number >= {minimum}, got {value!r}")


def _check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise KVConfigError(f"--kv-config: '{name}' must be one of {', '.join(choices)}; got {value!r}")


class PolicyOptions:
    """Base of the per-policy option dataclasses (`--kv-config '{...}'`)."""

    policy: ClassVar[str]

    def validate(self) -> None:
        """Check the options on their own."""

    def min_budget(self) -> int:
        """Smallest `--kv-budget` these options can honour."""
        return 1

    def check_budget(self, budget: int, flag: str = "--kv-budget") -> None:
        if budget < self.min_budget():
            raise KVConfigError(
                f"{flag} {budget} is too small for {self.policy}: {self.budget_floor_reason()}, "
                f"so the budget must be at least {self.min_budget()}"
            )

    def budget_floor_reason(self) -> str:
        return "it keeps at least one token"

    @classmethod
    def from_json(cls, text: "str | dict | None"):
        """Parse `--kv-config` (a JSON object, or an already parsed dict)."""
        data = parse_json_object(text)
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise KVConfigError(
                f"--kv-config: unknown key(s) {', '.join(unknown)} for --kv {cls.policy}; "
                f"valid keys: {', '.join(known) or '(none)'}"
            )
        data = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        options = cls(**data)
        options.validate()
        return options

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def parse_json_object(text: "str | dict | None", what: str = "--kv-config") -> dict:
    """A JSON object given as text (or already a dict); `what` names the option in errors."""
    if text is None or text == "":
        return {}
    if isinstance(text, dict):
        return dict(text)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise KVConfigError(f"{what} is not valid JSON ({e.msg} at char {e.pos}): {text!r}") from None
    if not isinstance(data, dict):
        raise KVConfigError(f"{what} must be a JSON object, got {text!r}")
    return data


@dataclass(frozen=True)
class FullOptions(PolicyOptions):
    """`--kv full`: SGLang's dense attention, no options."""

    policy: ClassVar[str] = "full"


@dataclass(frozen=True)
class DynSplitConfig(PolicyOptions):
    """DynSplit-KV options (`--kv dynsplit --kv-config '{"block_size": 16, ...}'`).

    block_size:     C, the target length of a semantic block in tokens.
    delta:          Δ, blocks end anywhere in [C-Δ, C+Δ] tokens after their start.
    lookahead:      |F|, how many following queries score a candidate boundary. A boundary is
                    decided once these tokens exist, so it never depends on anything later.
    alpha:          α, weight of the penalty on attention to the distant past (DD-Select).
    local_window:   R, keys just before a candidate that count as neither "retained" (the new block)
                    nor "distant" (the past beyond R) in the DD-Select score.
    sink_tokens:    first tokens of the sequence that every decode step attends to.
    recent_tokens:  last tokens of the sequence that every decode step attends to.
    score_layers:   layers whose attention feeds the DD-Select score; None picks 4 layers spread
                    over the middle half of the model (the middle layers carry the most semantic
                    signal, and 4 keep the extra prefill cost small).
    score_heads:    query heads used for the score; None uses all of them.
    candidates:     "delimiters": boundaries fall after tokens holding punctuation, brackets or a
                    line break (the candidate set; DD-Select picks among them by importance);
                    "all": any token may end a block.
    delimiter_chars: with "delimiters": the characters that make a token a candidate (its text
                    contains one); None: punctuation, brackets, quotes, tabs and line breaks
                    (delimiters.DELIMITER_CHARS). E.g. ".!?\n" lets blocks end at sentence ends only.
    split:          how a block end is chosen in [C-Δ, C+Δ]: "dd_select" (the highest DD-Select
                    score), "punctuation" (the candidate delimiter closest to length C, no scores:
                    the fixed-delimiter ablation) or "fixed_interval" (always length C: Quest-style
                    pages, the rigid ablation). The latter two need no attention statistics.
    weighting:      DD-Select importance of a candidate: "position" (its own score s_i) or
                    "delimiter_type" (the mean score of every candidate so far with the same token).
    layer_budgets:  "uniform" (every layer gets the budget) or "dynamickv" (DynamicKV's task-aware
                    per-layer budgets from the last prompt queries, summing to num_layers * budget).
    trace_path:     debugging aid: append one JSON line per request with its block boundaries
                    and one per cache flush with the pool counters. None disables it.
    """

    policy: ClassVar[str] = "dynsplit"
    block_size: int = 16
    delta: int = 4
    lookahead: int = 8
    alpha: float = 1.0
    local_window: int = 16
    sink_tokens: int = 4
    recent_tokens: int = 32
    score_layers: Optional[tuple[int, ...]] = None
    score_heads: Optional[tuple[int, ...]] = None
    candidates: str = "delimiters"
    delimiter_chars: Optional[str] = None
    split: str = "dd_select"
    weighting: str = "position"
    layer_budgets: str = "uniform"
    trace_path: Optional[str] = None

    @property
    def uses_scores(self) -> bool:
        """Whether block ends depend on DD-Select scores (and so on attention statistics)."""
        return self.split == "dd_select"

    @property
    def window_lo(self) -> int:
        """Offset from a block's start of its earliest allowed end."""
        return self.block_size - 1 if self.split == "fixed_interval" else self.block_size - self.delta - 1

    @property
    def window_width(self) -> int:
        """How many end positions a block may choose from."""
        return 1 if self.split == "fixed_interval" else 2 * self.delta + 1

    @property
    def decision_delay(self) -> int:
        """Tokens after a block's latest allowed end before it can be decided."""
        return self.lookahead if self.uses_scores else 0

    @property
    def min_block(self) -> int:
        return self.window_lo + 1

    @property
    def max_block(self) -> int:
        return self.window_lo + self.window_width

    @property
    def max_open_tail(self) -> int:
        """Longest possible open (not yet closed) tail: a block is decided `decision_delay`
        tokens after its longest possible end."""
        return self.max_block + self.decision_delay

    @property
    def band(self) -> int:
        """Keys before a query that the DD-Select score reads (look-ahead + local window)."""
        return self.lookahead + self.local_window

    @property
    def always_kept(self) -> int:
        """Upper bound of the tokens a decode step keeps whatever the scores are."""
        return self.sink_tokens + self.max_open_tail + self.recent_tokens

    def min_budget(self) -> int:
        return self.always_kept

    def budget_floor_reason(self) -> str:
        return (
            f"every step keeps the sink ({self.sink_tokens}), the open tail (up to "
            f"{self.max_open_tail}) and the recent window ({self.recent_tokens})"
        )

    def validate(self) -> None:
        _check_int("block_size", self.block_size, 2)
        _check_int("delta", self.delta, 0)
        _check_int("lookahead", self.lookahead, 1)
        _check_int("local_window", self.local_window, 0)
        _check_int("sink_tokens", self.sink_tokens, 0)
        _check_int("recent_tokens", self.recent_tokens, 0)
        if self.delta >= self.block_size:
            raise KVConfigError(
                f"--kv-config: 'block_size' (C={self.block_size}) must be larger than "
                f"'delta' (Δ={self.delta}), so every block has at least one token"
            )
        _check_number("alpha", self.alpha, 0)
        _check_choice("candidates", self.candidates, CANDIDATE_MODES)
        if self.delimiter_chars is not None:
            if not isinstance(self.delimiter_chars, str) or not self.delimiter_chars:
                raise KVConfigError(f"--kv-config: 'delimiter_chars' must be a non-empty string or null, got {self.delimiter_chars!r}")
            if self.candidates == "all":
                raise KVConfigError("--kv-config: 'delimiter_chars' chooses the candidate delimiters, but 'candidates' "
                                    "is \"all\" (every token a candidate); use \"delimiters\" or drop delimiter_chars")
        _check_choice("split", self.split, SPLIT_RULES)
        _check_choice("weighting", self.weighting, WEIGHTINGS)
        _check_choice("layer_budgets", self.layer_budgets, LAYER_BUDGETS)
        for name in ("score_layers", "score_heads"):
            value = getattr(self, name)
            if value is not None and (
                len(value) == 0 or any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in value)
            ):
                raise KVConfigError(
                    f"--kv-config: '{name}' must be a non-empty list of indices >= 0 "
                    f"or null, got {list(value)!r}"
                )


@dataclass(frozen=True)
class QuestOptions(PolicyOptions):
    """Quest (`--kv quest`): fixed pages with per-channel key min/max, top pages per decode step.

    page_size:    tokens per page (Quest: 16).
    dense_layers: the first layers attend to everything (Quest's paper: 2). 0 by default so that
                  every layer honours the budget, as for the other policies.
    """

    policy: ClassVar[str] = "quest"
    page_size: int = 16
    dense_layers: int = 0

    def validate(self) -> None:
        _check_int("page_size", self.page_size, 1)
        _check_int("dense_layers", self.dense_layers, 0)

    def min_budget(self) -> int:
        return self.page_size  # the open (unfinished) page is always attended

    def budget_floor_reason(self) -> str:
        return f"every step keeps the unfinished page (up to {self.page_size} tokens)"


@dataclass(frozen=True)
class SnapKVOptions(PolicyOptions):
    """SnapKV (`--kv snapkv`): the last `window` prompt queries vote, per KV head, for the prompt
    tokens to keep (pooled attention); the window itself is always kept (it counts in the budget).

    window:      observation window (SnapKV: 32).
    kernel_size: 1-D pooling kernel over positions (SnapKV: 5).
    pooling:     "avg" or "max".
    """

    policy: ClassVar[str] = "snapkv"
    window: int = 32
    kernel_size: int = 5
    pooling: str = "avg"

    def validate(self) -> None:
        _check_int("window", self.window, 1)
        _check_int("kernel_size", self.kernel_size, 1)
        if self.kernel_size % 2 == 0:
            raise KVConfigError(f"--kv-config: 'kernel_size' must be odd (the pooling is centred), got {self.kernel_size}")
        _check_choice("pooling", self.pooling, POOLINGS)

    def min_budget(self) -> int:
        return self.window + 1

    def budget_floor_reason(self) -> str:
        return f"the observation window ({self.window}) is always kept and at least one more token is chosen"


@dataclass(frozen=True)
class PyramidKVOptions(SnapKVOptions):
    """PyramidKV (`--kv pyramidkv`): SnapKV's scores with budgets that shrink linearly with depth
    (the first layer keeps about twice the mean, the last about mean/beta).

    beta: ratio that sets the smallest layer budget (PyramidKV: 20).
    """

    policy: ClassVar[str] = "pyramidkv"
    window: int = 8
    beta: int = 20

    def validate(self) -> None:
        super().validate()
        _check_int("beta", self.beta, 1)


@dataclass(frozen=True)
class DynamicKVOptions(SnapKVOptions):
    """DynamicKV (`--kv dynamickv`): task-aware per-layer budgets from the global competition of
    every layer's pooled window scores; per-KV-head selection inside each layer.

    r_max:           a layer's temporary maximum budget is r_max times the mean (DynamicKV: 10).
    update_interval: m, layers between two re-allocations in the authors' progressive schedule
                     (kept for reference: with the KV resident, only the final one matters).
    """

    policy: ClassVar[str] = "dynamickv"
    window: int = 8
    kernel_size: int = 7
    r_max: float = 10.0
    update_interval: int = 4

    def validate(self) -> None:
        super().validate()
        _check_number("r_max", self.r_max, 1)
        _check_int("update_interval", self.update_interval, 1)


@dataclass(frozen=True)
class WindowKVOptions(PolicyOptions):
    """WindowKV (`--kv windowkv`): keep whole windows of consecutive prompt tokens, scored once per
    group of layers and shared by all heads and by every layer of the group.

    review_window:  W, tokens per window (WindowKV: 8).
    shared_layers:  G, layers per group that share the selected windows (WindowKV: 8).
    suffix_max:     observation suffix for the "max" (localization, QA) rule (WindowKV: 32).
    suffix_mean:    observation suffix for the "mean" (aggregation) rule (WindowKV: 16).
    beta:           pyramid ratio of the group budgets (WindowKV: 14).
    rule:           "max", "mean", or "auto": the authors pick it with a fine-tuned BERT classifier
                    that is not available offline; "auto" uses "max" when the end of the prompt
                    asks a question (a '?' among its last `suffix_max` tokens), else "mean".
    """

    policy: ClassVar[str] = "windowkv"
    review_window: int = 8
    shared_layers: int = 8
    suffix_max: int = 32
    suffix_mean: int = 16
    beta: int = 14
    rule: str = "auto"

    def validate(self) -> None:
        for name in ("review_window", "shared_layers", "suffix_max", "suffix_mean", "beta"):
            _check_int(name, getattr(self, name), 1)
        _check_choice("rule", self.rule, WINDOW_RULES)

    @property
    def max_suffix(self) -> int:
        return max(self.suffix_max, self.suffix_mean)

    def min_budget(self) -> int:
        return self.max_suffix + self.review_window

    def budget_floor_reason(self) -> str:
        return f"the observation suffix (up to {self.max_suffix}) is always kept plus at least one window of {self.review_window}"


@dataclass(frozen=True)
class StreamingLLMOptions(PolicyOptions):
    """StreamingLLM (`--kv streamingllm`): the first `sink_tokens` plus the most recent tokens."""

    policy: ClassVar[str] = "streamingllm"
    sink_tokens: int = 4

    def validate(self) -> None:
        _check_int("sink_tokens", self.sink_tokens, 0)

    def min_budget(self) -> int:
        return self.sink_tokens + 1

    def budget_floor_reason(self) -> str:
        return f"the {self.sink_tokens} sink tokens and at least one recent token are kept"


@dataclass(frozen=True)
class SepLLMOptions(PolicyOptions):
    """SepLLM (`--kv sepllm`): initial tokens, separator tokens (`. , ? ! ; :`, spaces, tabs, line
    breaks), and the most recent tokens; the newest separators win when there are too many.

    initial_tokens: a, the first tokens (SepLLM: 4).
    recent_tokens:  w, the recent window; None means half the budget (SepCache: 256 of 512).
    """

    policy: ClassVar[str] = "sepllm"
    initial_tokens: int = 4
    recent_tokens: Optional[int] = None

    def validate(self) -> None:
        _check_int("initial_tokens", self.initial_tokens, 0)
        if self.recent_tokens is not None:
            _check_int("recent_tokens", self.recent_tokens, 1)

    def recent(self, budget: int) -> int:
        return budget // 2 if self.recent_tokens is None else self.recent_tokens

    def min_budget(self) -> int:
        return self.initial_tokens + (self.recent_tokens or 1) + 1

    def budget_floor_reason(self) -> str:
        return "the initial tokens, the recent window and at least one separator must fit"


POLICY_OPTIONS: dict[str, type[PolicyOptions]] = {
    cls.policy: cls
    for cls in (
        FullOptions, DynSplitConfig, QuestOptions, SnapKVOptions, PyramidKVOptions,
        DynamicKVOptions, WindowKVOptions, StreamingLLMOptions, SepLLMOptions,
    )
}
POLICIES = tuple(POLICY_OPTIONS)


@dataclass(frozen=True)
class KVConfig:
    """What `--kv`, `--kv-budget`, `--kv-config` and `--kv-variants` chose.

    policy:   name of the KV policy (`full` is dense attention, the reference).
    budget:   KV tokens one request attends to per decode step (per layer and KV head; the per-layer
              mean for policies with per-layer budgets), sink and recent tokens included. Sequences
              no longer than this are dense. A request may override it (custom_params.kv_budget).
    options:  the policy's options dataclass.
    variants: more policies the same server runs, by label (label -> options dataclass); a request
              picks one with custom_params.kv_policy (default: `policy`). Every policy keeps its
              state for every request, so requests that share a prompt share its prefill whichever
              policy they pick.
    """

    policy: str = "full"
    budget: int = DEFAULT_BUDGET
    options: Any = None
    variants: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.options is None and self.policy in POLICY_OPTIONS:
            object.__setattr__(self, "options", POLICY_OPTIONS[self.policy]())

    @property
    def policies(self) -> dict:
        """Every policy this server runs, by the label a request names it with: the --kv policy
        under its own name first, then the variants."""
        return {self.policy: self.options, **self.variants}

    def validate(self, context_length: Optional[int] = None) -> None:
        if self.policy not in POLICIES:
            raise KVConfigError(f"--kv: unknown policy {self.policy!r}; valid choices: {', '.join(POLICIES)}")
        check_budget_value(self.budget)
        if context_length is not None and self.budget > context_length:
            raise KVConfigError(
                f"--kv-budget {self.budget} is larger than the model's context length ({context_length})"
            )
        if self.variants and self.policy == "full":
            raise KVConfigError("--kv-variants applies to a compressing policy; add e.g. --kv dynsplit")
        for label, options in self.policies.items():
            options.validate()
            options.check_budget(self.budget, "--kv-budget" if label == self.policy else f"--kv-budget (variant {label!r})")

    def to_dict(self) -> dict:
        return {
            "policy": self.policy, "budget": self.budget, "options": self.options.to_dict(),
            "variants": {label: {"policy": o.policy, **o.to_dict()} for label, o in self.variants.items()},
        }

    @classmethod
    def from_dict(cls, data: dict) -> "KVConfig":
        policy = data["policy"]
        return cls(
            policy=policy, budget=data["budget"], options=POLICY_OPTIONS[policy].from_json(data.get("options")),
            variants=parse_variants(data.get("variants"), policy),
        )


def parse_variants(text: "str | dict | None", main_policy: str) -> dict:
    """`--kv-variants '{"LABEL": {"policy": NAME, ...options}, ...}'` -> label -> options dataclass.

    "policy" defaults to the label itself, so '{"snapkv": {}, "quest": {"page_size": 32}}' adds
    those two policies with their options. A label may not be "full" or the --kv policy's name
    (that one is configured with --kv-config).
    """
    variants = {}
    for label, spec in parse_json_object(text, "--kv-variants").items():
        where = f"--kv-variants {label!r}"
        if not isinstance(spec, dict):
            raise KVConfigError(f"{where} must map to a JSON object of options, got {spec!r}")
        if label in ("full", main_policy) or not label:
            raise KVConfigError(
                f"{where}: the label may not be empty, 'full' or the --kv policy's own name "
                f"({main_policy!r}, configured with --kv-config)"
            )
        spec = dict(spec)
        policy = spec.pop("policy", label)
        if policy not in POLICIES or policy == "full":
            raise KVConfigError(
                f"{where}: unknown policy {policy!r}; give \"policy\": one of {', '.join(p for p in POLICIES if p != 'full')}"
            )
        try:
            variants[label] = POLICY_OPTIONS[policy].from_json(spec)
        except KVConfigError as e:
            raise KVConfigError(str(e).replace("--kv-config", where, 1)) from None
    return variants


def check_budget_value(budget, flag: str = "--kv-budget") -> None:
    if not isinstance(budget, int) or isinstance(budget, bool) or budget <= 0:
        raise KVConfigError(f"{flag} must be a positive number of tokens, got {budget!r}")
