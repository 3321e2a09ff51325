"""Configuration of the KV policies: what `--kv`, `--kv-budget` and `--dynsplit-config` mean.

One dataclass per concept, validated once at startup. Every error is a `KVConfigError` whose
message names the flag, the bad value and the valid choices, so the CLI can print it as one line.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Optional

POLICIES = ("full", "dynsplit")
DEFAULT_BUDGET = 2048
CANDIDATE_MODES = ("delimiters", "all")


class KVConfigError(ValueError):
    """A wrong `--kv*` value; the message is a complete, user-facing sentence."""


@dataclass(frozen=True)
class DynSplitConfig:
    """DynSplit-KV parameters (`--dynsplit-config '{"block_size": 16, ...}'`).

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
    trace_path:     debugging aid: append one JSON line per request with its block boundaries
                    and one per cache flush with the pool counters. None disables it.
    """

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
    trace_path: Optional[str] = None

    @property
    def min_block(self) -> int:
        return self.block_size - self.delta

    @property
    def max_block(self) -> int:
        return self.block_size + self.delta

    @property
    def max_open_tail(self) -> int:
        """Longest possible open (not yet closed) tail: a block is decided `lookahead` tokens
        after its longest possible end."""
        return self.max_block + self.lookahead

    @property
    def band(self) -> int:
        """Keys before a query that the DD-Select score reads (look-ahead + local window)."""
        return self.lookahead + self.local_window

    @property
    def always_kept(self) -> int:
        """Upper bound of the tokens a decode step keeps whatever the scores are."""
        return self.sink_tokens + self.max_open_tail + self.recent_tokens

    def validate(self) -> None:
        def positive(name: str, value: int, minimum: int = 1) -> None:
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise KVConfigError(
                    f"--dynsplit-config: '{name}' must be an integer >= {minimum}, got {value!r}"
                )

        positive("block_size", self.block_size, 2)
        positive("delta", self.delta, 0)
        positive("lookahead", self.lookahead, 1)
        positive("local_window", self.local_window, 0)
        positive("sink_tokens", self.sink_tokens, 0)
        positive("recent_tokens", self.recent_tokens, 0)
        if self.delta >= self.block_size:
            raise KVConfigError(
                f"--dynsplit-config: 'block_size' (C={self.block_size}) must be larger than "
                f"'delta' (Δ={self.delta}), so every block has at least one token"
            )
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or self.alpha < 0:
            raise KVConfigError(f"--dynsplit-config: 'alpha' must be a number >= 0, got {self.alpha!r}")
        if self.candidates not in CANDIDATE_MODES:
            raise KVConfigError(
                f"--dynsplit-config: 'candidates' must be one of {', '.join(CANDIDATE_MODES)}; "
                f"got {self.candidates!r}"
            )
        for name in ("score_layers", "score_heads"):
            value = getattr(self, name)
            if value is not None and (
                len(value) == 0 or any(not isinstance(v, int) or v < 0 for v in value)
            ):
                raise KVConfigError(
                    f"--dynsplit-config: '{name}' must be a non-empty list of indices >= 0 "
                    f"or null, got {list(value)!r}"
                )

    @classmethod
    def from_json(cls, text: str | dict | None) -> "DynSplitConfig":
        """Parse `--dynsplit-config` (a JSON object, or an already parsed dict)."""
        if text is None or text == "":
            data: dict[str, Any] = {}
        elif isinstance(text, dict):
            data = dict(text)
        else:
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise KVConfigError(f"--dynsplit-config is not valid JSON ({e.msg} at char {e.pos}): {text!r}") from None
            if not isinstance(data, dict):
                raise KVConfigError(f"--dynsplit-config must be a JSON object, got {text!r}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise KVConfigError(
                f"--dynsplit-config: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(known)}"
            )
        for name in ("score_layers", "score_heads"):
            if isinstance(data.get(name), list):
                data[name] = tuple(data[name])
        config = cls(**data)
        config.validate()
        return config

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class KVConfig:
    """What `--kv`, `--kv-budget` and `--dynsplit-config` chose.

    policy: name of the KV policy (`full` is dense attention, the reference).
    budget: KV tokens one request attends to per decode step (per layer and KV head), sink,
            open tail and recent window included. Sequences no longer than this are dense.
    """

    policy: str = "full"
    budget: int = DEFAULT_BUDGET
    dynsplit: DynSplitConfig = field(default_factory=DynSplitConfig)

    def validate(self, context_length: Optional[int] = None) -> None:
        if self.policy not in POLICIES:
            raise KVConfigError(f"--kv: unknown policy {self.policy!r}; valid choices: {', '.join(POLICIES)}")
        if not isinstance(self.budget, int) or isinstance(self.budget, bool) or self.budget <= 0:
            raise KVConfigError(f"--kv-budget must be a positive number of tokens, got {self.budget!r}")
        if context_length is not None and self.budget > context_length:
            raise KVConfigError(
                f"--kv-budget {self.budget} is larger than the model's context length ({context_length})"
            )
        self.dynsplit.validate()
        if self.policy == "dynsplit" and self.budget < self.dynsplit.always_kept:
            d = self.dynsplit
            raise KVConfigError(
                f"--kv-budget {self.budget} is too small for dynsplit: every step keeps the sink "
                f"({d.sink_tokens}), the open tail (up to {d.max_open_tail}) and the recent window "
                f"({d.recent_tokens}), so the budget must be at least {d.always_kept}"
            )

    def to_dict(self) -> dict:
        return {"policy": self.policy, "budget": self.budget, "dynsplit": self.dynsplit.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> "KVConfig":
        return cls(
            policy=data["policy"],
            budget=data["budget"],
            dynsplit=DynSplitConfig.from_json(data.get("dynsplit")),
        )
