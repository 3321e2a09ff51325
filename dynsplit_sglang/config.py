"""Configuration of the KV policies: what `--kv`, `--kv-budget`, `--kv-config` and `--kv-variants` mean.

Each policy declares its own frozen options dataclass next to its class (`policies/*.py`, a
`PolicyOptions` whose fields are made with `option(default, help)`); the registry in
`dynsplit_sglang.policies` is built from the classes, and the CLI choices, `--kv-config`
validation and the README's option tables all read it. Options are validated once at startup.
Every error is a `KVConfigError` whose message names the flag, the bad value and the valid
choices, so the CLI can print it as one line.

The budget means the same for every policy: the KV tokens one request attends to per decode step
in a layer (per KV head), sink and recent tokens included. Policies with per-layer budgets
(PyramidKV, DynamicKV, WindowKV, `dynsplit` with `layer_budgets: dynamickv`) keep the sum over
layers at `num_layers * budget`, so the budget is the per-layer mean.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, ClassVar

DEFAULT_BUDGET = 2048


class KVConfigError(ValueError):
    """A wrong `--kv*` value; the message is a complete, user-facing sentence."""


def option(default, help: str):
    """A field of a policy's options dataclass: its default and a one-line meaning for users
    (shown in the README's option tables and in `python -m dynsplit_sglang.policies`)."""
    return dataclasses.field(default=default, metadata={"help": help})


def check_int(name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise KVConfigError(f"--kv-config: '{name}' must be an integer >= {minimum}, got {value!r}")


def check_number(name: str, value, minimum: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < minimum:
        raise KVConfigError(f"--kv-config: '{name}' must be a number >= {minimum}, got {value!r}")


def check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise KVConfigError(f"--kv-config: '{name}' must be one of {', '.join(choices)}; got {value!r}")


class PolicyOptions:
    """Base of the per-policy option dataclasses (`--kv-config '{...}'`). `policy` is the name
    `--kv` knows the policy by (the policy class takes its name from here)."""

    policy: ClassVar[str]

    def validate(self) -> None:
        """Check the options on their own."""

    def check_model(self, hf_config: dict, flag: str) -> None:
        """Check the options against the model's config.json (e.g. layer indices); `flag` names
        where they came from in errors."""

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
    def from_json(cls, text: str | dict | None):
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

    @classmethod
    def help(cls) -> dict[str, str]:
        """Option name -> its one-line meaning."""
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


def parse_json_object(text: str | dict | None, what: str = "--kv-config") -> dict:
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


def policy_options() -> dict[str, type[PolicyOptions]]:
    """--kv name -> its options dataclass (`full` first), from the policy registry."""
    from dynsplit_sglang.policies import POLICY_OPTIONS

    return POLICY_OPTIONS


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
        if self.options is None and self.policy in policy_options():
            object.__setattr__(self, "options", policy_options()[self.policy]())

    @property
    def policies(self) -> dict:
        """Every policy this server runs, by the label a request names it with: the --kv policy
        under its own name first, then the variants."""
        return {self.policy: self.options, **self.variants}

    def validate(self, context_length: int | None = None) -> None:
        check_policy_name(self.policy)
        check_budget_value(self.budget)
        if context_length is not None and self.budget > context_length:
            raise KVConfigError(
                f"--kv-budget {self.budget} is larger than the model's context length ({context_length})"
            )
        if self.variants and self.policy == "full":
            raise KVConfigError("--kv-variants applies to a compressing policy; add e.g. --kv dynsplit")
        for label, options in self.policies.items():
            options.validate()
            options.check_budget(
                self.budget, "--kv-budget" if label == self.policy else f"--kv-budget (variant {label!r})"
            )

    def to_dict(self) -> dict:
        return {
            "policy": self.policy,
            "budget": self.budget,
            "options": self.options.to_dict(),
            "variants": {label: {"policy": o.policy, **o.to_dict()} for label, o in self.variants.items()},
        }

    @classmethod
    def from_dict(cls, data: dict) -> KVConfig:
        policy = data["policy"]
        return cls(
            policy=policy,
            budget=data["budget"],
            options=policy_options()[policy].from_json(data.get("options")),
            variants=parse_variants(data.get("variants"), policy),
        )


def parse_variants(text: str | dict | None, main_policy: str) -> dict:
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
        if policy not in policy_options() or policy == "full":
            compressing = ", ".join(p for p in policy_options() if p != "full")
            raise KVConfigError(f'{where}: unknown policy {policy!r}; give "policy": one of {compressing}')
        try:
            variants[label] = policy_options()[policy].from_json(spec)
        except KVConfigError as e:
            raise KVConfigError(str(e).replace("--kv-config", where, 1)) from None
    return variants


def check_budget_value(budget, flag: str = "--kv-budget") -> None:
    if not isinstance(budget, int) or isinstance(budget, bool) or budget <= 0:
        raise KVConfigError(f"{flag} must be a positive number of tokens, got {budget!r}")


def check_policy_name(policy) -> None:
    if policy not in policy_options():
        raise KVConfigError(f"--kv: unknown policy {policy!r}; valid choices: {', '.join(policy_options())}")
