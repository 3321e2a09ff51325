"""DynSplit-KV: semantic blocks chosen by DD-Select, uniform block records, top-k at decode."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from dynsplit_sglang import metrics
from dynsplit_sglang.block_table import BlockTable, ModelShape
from dynsplit_sglang.config import KVConfig, KVConfigError, PolicyOptions, check_choice, check_int, check_number, option
from dynsplit_sglang.delimiters import candidate_token_mask
from dynsplit_sglang.hybrid_layers import compressed_layers
from dynsplit_sglang.kernels.block_select import (
    most_blocks_taken,
    score_blocks,
    score_blocks_batched,
    select_block_runs,
    select_positions,
)
from dynsplit_sglang.kernels.dd_select import band_rows_from_logits, candidate_scores
from dynsplit_sglang.kernels.window_scores import window_scores
from dynsplit_sglang.layer_budgets import dynamickv
from dynsplit_sglang.policies.base import KVPolicy, PolicyNeeds, RequestView, all_positions, forget_rows
from dynsplit_sglang.policies.dynamickv import DynamicKVOptions, dynamickv_scores
from dynsplit_sglang.policies.prefill_selection import PromptQueries
from dynsplit_sglang.splitter import decision_position, split, type_totals

CANDIDATE_MODES = ("delimiters", "all")
SPLIT_RULES = ("dd_select", "fixed_interval", "punctuation")
WEIGHTINGS = ("position", "delimiter_type")
LAYER_BUDGETS = ("uniform", "dynamickv")
# Prompt queries whose attention ranks the blocks of the resident set (SnapKV's window).
RESIDENT_WINDOW = 32
RESIDENT_RANKS = ("per_head", "sum")


@dataclass(frozen=True)
class ResidentOptions(PolicyOptions):
    """Eviction for the decode-time policies (DynSplit-KV, Quest): after the prompt, a resident set
    of whole blocks stays and the rest of the private prompt goes back to SGLang's pool; every
    step selects within the resident set (see docs/design.md, "Eviction")."""

    evict: bool = option(
        True,
        "free the prompt KV outside a resident set of whole blocks (`resident` x budget tokens, the blocks "
        f"the prompt's last {RESIDENT_WINDOW} queries attend to most), chosen when the prompt is in; "
        "each step then selects within it",
    )
    resident: float = option(2.0, "with `evict`: prompt tokens kept resident, as a multiple of the budget (>= 1)")
    resident_rank: str = option(
        "per_head",
        'with `evict`: how blocks are ranked for the resident set: `"per_head"` (each layer\'s KV head ranks '
        "them by its own attention per token; a block goes by its best rank over heads, so every head keeps "
        'its top blocks, as SnapKV keeps each head\'s tokens) or `"sum"` (attention per token summed over '
        "layers and heads)",
    )

    def validate(self) -> None:
        if not isinstance(self.evict, bool):
            raise KVConfigError(f"--kv-config: 'evict' must be true or false, got {self.evict!r}")
        check_number("resident", self.resident, 1)
        check_choice("resident_rank", self.resident_rank, RESIDENT_RANKS)


@dataclass(frozen=True)
class DynSplitOptions(ResidentOptions):
    """DynSplit-KV's options (`--kv dynsplit --kv-config '{"block_size": 16, ...}'`); the same
    rules describe Quest's rigid pages (quest.py). DD-Select's score for a boundary after position
    i reads the `lookahead` queries after it: their attention on the new block (after i) against
    `alpha` times their attention on the distant past (before the `local_window` keys at i); see
    docs/design.md."""

    policy: ClassVar[str] = "dynsplit"
    block_size: int = option(16, "C, target block length in tokens")
    delta: int = option(4, "Δ: blocks end anywhere in C±Δ (must be < C)")
    lookahead: int = option(
        8, "following queries that score a candidate boundary; a boundary is decided once they exist"
    )
    alpha: float = option(1.0, "weight of the penalty on attention to the distant past in the DD-Select score")
    local_window: int = option(16, "keys just before a candidate that count as neither retained nor distant")
    sink_tokens: int = option(4, "first tokens every step attends to")
    recent_tokens: int = option(32, "last tokens every step attends to")
    score_layers: tuple[int, ...] | None = option(
        None, "layers feeding the DD-Select score; `null` = 4 layers spread over the middle half of the model"
    )
    score_heads: tuple[int, ...] | None = option(None, "query heads feeding the score; `null` = all")
    candidates: str = option(
        "delimiters",
        'which tokens may end a block: `"delimiters"` (punctuation, brackets, quotes, line breaks) or `"all"`',
    )
    delimiter_chars: str | None = option(
        None,
        'with `"delimiters"`: the characters that make a token a candidate (its text contains one); '
        '`null`: punctuation, brackets, quotes, tab and line break; e.g. `".!?\\n"` for sentence ends only',
    )
    split: str = option(
        "dd_select",
        'how a block end is chosen in C±Δ: the best DD-Select score; `"punctuation"` (the delimiter '
        'closest to C, no scores) or `"fixed_interval"` (always C) are the ablations',
    )
    weighting: str = option(
        "position",
        'DD-Select weight of a candidate: its own score, or `"delimiter_type"`: the mean score of '
        "every candidate so far with the same token",
    )
    layer_budgets: str = option(
        "uniform",
        '`"dynamickv"`: DynamicKV\'s per-layer shares of layers x budget (each at least what a step always keeps)',
    )
    trace_path: str | None = option(
        None,
        "debugging: append each request's block boundaries and the pool counters at cache flushes "
        "to this file as JSON lines",
    )

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
        super().validate()
        check_int("block_size", self.block_size, 2)
        check_int("delta", self.delta, 0)
        check_int("lookahead", self.lookahead, 1)
        check_int("local_window", self.local_window, 0)
        check_int("sink_tokens", self.sink_tokens, 0)
        check_int("recent_tokens", self.recent_tokens, 0)
        if self.delta >= self.block_size:
            raise KVConfigError(
                f"--kv-config: 'block_size' (C={self.block_size}) must be larger than "
                f"'delta' (Δ={self.delta}), so every block has at least one token"
            )
        check_number("alpha", self.alpha, 0)
        check_choice("candidates", self.candidates, CANDIDATE_MODES)
        if self.delimiter_chars is not None:
            if not isinstance(self.delimiter_chars, str) or not self.delimiter_chars:
                raise KVConfigError(
                    f"--kv-config: 'delimiter_chars' must be a non-empty string or null, got {self.delimiter_chars!r}"
                )
            if self.candidates == "all":
                raise KVConfigError(
                    "--kv-config: 'delimiter_chars' chooses the candidate delimiters, but 'candidates' "
                    'is "all" (every token a candidate); use "delimiters" or drop delimiter_chars'
                )
        check_choice("split", self.split, SPLIT_RULES)
        check_choice("weighting", self.weighting, WEIGHTINGS)
        check_choice("layer_budgets", self.layer_budgets, LAYER_BUDGETS)
        if self.evict and self.layer_budgets != "uniform":
            raise KVConfigError(
                "--kv-config: 'layer_budgets' \"dynamickv\" needs 'evict' false (a layer's dynamickv share may "
                'outgrow the resident set, which is on by default); add "evict": false'
            )
        for name in ("score_layers", "score_heads"):
            value = getattr(self, name)
            if value is not None and (
                len(value) == 0 or any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in value)
            ):
                raise KVConfigError(
                    f"--kv-config: '{name}' must be a non-empty list of indices >= 0 or null, got {list(value)!r}"
                )

    def check_model(self, hf_config: dict, flag: str) -> None:
        layers = len(compressed_layers(hf_config)) if hf_config.get("num_hidden_layers") else None
        what = "compressed (full-attention) layers" if hf_config.get("layer_types") else "layers (num_hidden_layers)"
        for name, limit, unit in (
            ("score_layers", layers, what),
            ("score_heads", hf_config.get("num_attention_heads"), "heads (num_attention_heads)"),
        ):
            chosen = getattr(self, name)
            if limit and chosen and max(chosen) >= limit:
                raise KVConfigError(f"{flag}: '{name}' {list(chosen)} out of range; the model has {limit} {unit}")


# DynamicKV's own defaults, used when `layer_budgets` is "dynamickv".
LAYER_BUDGET_SCORING = DynamicKVOptions()


def default_score_layers(num_layers: int, count: int = 4) -> tuple[int, ...]:
    """`count` layers spread evenly over the middle half of the model."""
    lo, hi = num_layers // 4, max(num_layers // 4 + 1, (3 * num_layers) // 4)
    if hi - lo <= count:
        return tuple(range(lo, hi))
    step = (hi - lo) / count
    return tuple(sorted({lo + int(step * i + step / 2) for i in range(count)}))


def window_mass(r: RequestView, window: dict, key_buffers) -> torch.Tensor:
    """[L * KvH, n] fp32: the attention the prompt's last queries pay each prompt token, summed
    over the window and each KV head's query heads, one row per (layer, KV head) in layer order."""
    rows = []
    for layer, (q, scale) in sorted(window.items()):
        keys = key_buffers[layer][r.row_slots]
        rows.append(window_scores(q, keys, r.seq_len - q.shape[0], scale).to(r.row_slots.device))
    return torch.cat(rows)


def block_order(mass: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor, rank: str) -> torch.Tensor:
    """Blocks best first for the resident set.

    mass: [heads, n] window attention per (layer, KV head) and token; starts, ends: [B] inclusive
    token ranges. Each block scores its attention per token. "sum": summed over heads.
    "per_head": by its best rank among the heads (a block one retrieval head needs outranks one
    that every head likes a little), ties by the sum. returns [B] block indices.
    """
    cumulative = torch.nn.functional.pad(mass.cumsum(dim=1), (1, 0))
    density = (cumulative[:, ends + 1] - cumulative[:, starts]) / (ends - starts + 1)  # [heads, B]
    by_sum = torch.argsort(density.sum(dim=0), descending=True, stable=True)
    if rank == "sum":
        return by_sum
    ranks = torch.empty_like(density, dtype=torch.int64)
    order = torch.argsort(density, dim=1, descending=True, stable=True)
    ranks.scatter_(1, order, torch.arange(density.shape[1], device=mass.device).expand_as(order))
    best = ranks.min(dim=0).values
    return by_sum[torch.argsort(best[by_sum], stable=True)]


def closed_up(positions: torch.Tensor, prefix: int, kept: torch.Tensor) -> torch.Tensor:
    """Positions after a compaction: those before the hit stay, the kept private ones [K] (sorted)
    close up right after it."""
    return torch.where(positions < prefix, positions, prefix + torch.searchsorted(kept, positions))


@dataclass(frozen=True)
class RowRecords:
    """The blocks a compacted request reads, kept from its prompt (until it leaves its row).

    records:   [nb] int64 record ids in position order: the hit's own (owned by its slots) and
               copies at closed-up positions of the others.
    owned:     [k] the copies: no slot owns them; back to the pool when the request leaves.
    open_from: where blocks closed later start (the open block's first position, closed up).
    """

    rid: str | None
    records: torch.Tensor
    owned: torch.Tensor
    open_from: int


@dataclass(frozen=True)
class BlockStep:
    """What every layer's selection reads of a decode step's R requests, built once per step.

    records:     [R, NB] int64 record ids of each request's closed blocks in position order, -1 after.
    first, cost: [R, NB] int64 first position a block gives and how many it gives (none of the
                 always-kept head and tail; 0 for padding).
    head, head_valid: [R, sink] int64 / bool the always-kept first positions.
    tail, tail_valid: [R, Tl] int64 / bool the always-kept last ones (open block, recent window).
    room:        [L, R] int64 budget left for blocks in each layer.
    run_len:     the most positions any block gives; most_taken: the most blocks any row can take.
    budgets:     per layer, each request's budget there (host); lengths: seq lengths (host).
    seq_lens, tail_from: [R] int64.
    """

    records: torch.Tensor
    first: torch.Tensor
    cost: torch.Tensor
    head: torch.Tensor
    head_valid: torch.Tensor
    tail: torch.Tensor
    tail_valid: torch.Tensor
    room: torch.Tensor
    run_len: int
    most_taken: int
    budgets: list[list[int]]
    lengths: list[int]
    seq_lens: torch.Tensor
    tail_from: torch.Tensor

    def rows(self, index: torch.Tensor) -> BlockStep:
        """The step of the requests `index` [S] only (the bounds stay the step's)."""
        kept = index.tolist()
        return BlockStep(
            **{
                f.name: getattr(self, f.name).index_select(0, index)
                for f in dataclasses.fields(self)
                if f.name not in ("room", "run_len", "most_taken", "budgets", "lengths")
            },
            room=self.room.index_select(1, index),
            run_len=self.run_len,
            most_taken=self.most_taken,
            budgets=[[b[i] for i in kept] for b in self.budgets],
            lengths=[self.lengths[i] for i in kept],
        )


class DynSplitPolicy(KVPolicy):
    """Decode-time: closed blocks get uniform records (per layer and KV head key min/max), and
    every decode step scores them against its query and attends to the best ones that fill the
    budget, plus the sink, the open tail and the recent window."""

    Options = DynSplitOptions
    name = Options.policy
    kind = "decode-time"
    summary = (
        "DynSplit-KV: the best semantic blocks (DD-Select boundaries, key min/max records), re-selected every "
        "step, plus sink, open tail, recent"
    )

    def block_rules(self) -> DynSplitOptions:
        """How blocks are cut and what every step keeps (for DynSplit-KV, its own options)."""
        return self.options

    def __init__(self, kv: KVConfig, shape: ModelShape, num_slots: int, dtype: torch.dtype, device, tokens=None):
        super().__init__(kv, shape, num_slots, dtype, device, tokens)
        blocks = self.blocks = self.block_rules()
        layers = (blocks.score_layers or default_score_layers(shape.num_layers)) if blocks.uses_scores else ()
        bad = [layer for layer in layers if layer >= shape.num_layers]
        if bad:
            raise ValueError(f"--kv-config: score_layers {bad} do not exist (the model has {shape.num_layers} layers)")
        if blocks.score_heads is not None and max(blocks.score_heads) >= shape.num_heads:
            raise ValueError(
                f"--kv-config: score_heads {list(blocks.score_heads)} do not exist "
                f"(the model has {shape.num_heads} query heads)"
            )
        # The prompt's last queries of every layer: DynamicKV's layer budgets or the resident set
        # rank with them (options allow one or the other).
        self.evicts = self.options.evict
        window = LAYER_BUDGET_SCORING.window if blocks.layer_budgets == "dynamickv" else 0
        window = RESIDENT_WINDOW if self.evicts else window
        self.needs = PolicyNeeds(
            score_layers=frozenset(layers),
            band_width=blocks.band if layers else 0,
            score_heads=blocks.score_heads,
            query_layers=frozenset(range(shape.num_layers)) if window else frozenset(),
            query_window=window,
        )
        self.table = BlockTable(num_slots, shape, blocks, dtype, device)
        vocab = tokens.vocab_size if tokens is not None else 1
        # [vocab] bool; None means every token is a candidate.
        self.candidate_mask = (
            None
            if blocks.candidates == "all"
            else candidate_token_mask(tokens, blocks.candidates, vocab, blocks.delimiter_chars).to(device)
        )
        self.by_type = blocks.uses_scores and blocks.weighting == "delimiter_type"
        self.token_ids = torch.zeros(num_slots, dtype=torch.int64, device=device) if self.by_type else None
        self.queries = PromptQueries(window) if window else None
        self._layer_budgets: dict[int, tuple[str | None, list[int]]] = {}  # row -> (rid, budgets)
        # Eviction. row -> (rid, [n] fp32 attention of the prompt's last queries on each prompt
        # token), from the prompt's last forward until the backend compacts it; row -> RowRecords
        # of a compacted request's blocks.
        self._window_mass: dict[int, tuple[str | None, torch.Tensor]] = {}
        self._resident: dict[int, tuple[str | None, torch.Tensor]] = {}  # row -> (rid, [n] bool) until compacted
        self._row_records: dict[int, RowRecords] = {}
        self._trace = open(blocks.trace_path, "a", buffering=1) if blocks.trace_path else None
        self._reqs: list[RequestView] = []
        self._is_decode = False
        self._rows: list[torch.Tensor] | torch.Tensor = []  # per request: [n, L] sum of DD rows over score layers
        self._gpu_selection = False  # select_slots_batch on the Triton kernel ($DYNSPLIT_SELECTION)
        self._blocks_now: BlockStep | None = None  # the decode step's blocks

    def begin_forward(self, reqs: list[RequestView], is_decode: bool) -> None:
        self._reqs = reqs
        self._is_decode = is_decode
        L = self.blocks.lookahead
        if is_decode:  # [R, 1, L]: one new token each, observed for all at once (observe_step)
            self._rows = torch.zeros(len(reqs), 1, L, device=self.table.band.device)
        else:
            self._rows = [torch.zeros(r.seq_len - r.new_start, L, device=r.row_slots.device) for r in reqs]
        if self.queries is not None and is_decode:
            self.queries.end_prompt(r.row for r in reqs)
        elif self.queries is not None:
            self.queries.begin(len(reqs))
        if is_decode:
            self._blocks_now = self._block_step(reqs)

    def _block_step(self, reqs: list[RequestView]) -> BlockStep:
        """Every request's closed blocks for this decode step, with what each can give."""
        t, cfg, device = self.table, self.blocks, self.table.rec_start.device
        # [R, NB] (NB >= 1: one padding column when no request has closed a block)
        padding = torch.full((1,), -1, dtype=torch.int64, device=device)
        records = torch.nn.utils.rnn.pad_sequence(
            [self._blocks_of(r, r.row_slots) for r in reqs] + [padding],
            batch_first=True,
            padding_value=-1,
        )[: len(reqs)]
        lengths = [r.seq_len for r in reqs]
        seq_lens = torch.tensor(lengths, device=device)
        live = records >= 0
        rec = records.clamp_min(0)
        count = live.sum(dim=1)
        last = rec.gather(1, (count - 1).clamp_min(0)[:, None])[:, 0]
        open_from = torch.tensor([self._row_open_from(r) for r in reqs], device=device)
        open_start = torch.where(count > 0, t.rec_end[last] + 1, 0).maximum(open_from)
        tail_from = open_start.minimum(seq_lens - cfg.recent_tokens).clamp_min(0)
        head_n = tail_from.clamp_max(cfg.sink_tokens)
        first = t.rec_start[rec].maximum(head_n[:, None])
        cost = ((t.rec_end[rec].minimum(tail_from[:, None] - 1) - first + 1).clamp_min(0)) * live
        head = torch.arange(cfg.sink_tokens, device=device)[None, :]
        tail_width = int((seq_lens - tail_from).max()) if reqs else 0
        tail = tail_from[:, None] + torch.arange(tail_width, device=device)
        budgets = [[self.layer_budget(r, layer) for r in reqs] for layer in range(self.shape.num_layers)]
        room = torch.tensor(budgets, device=device) - head_n - (seq_lens - tail_from)
        return BlockStep(
            records=records,
            first=first,
            cost=cost,
            head=head.expand(len(reqs), -1),
            head_valid=head < head_n[:, None],
            tail=tail,
            tail_valid=tail < seq_lens[:, None],
            room=room,
            run_len=int(cost.max()) if cost.numel() else 0,
            most_taken=most_blocks_taken(cost, room.amax(dim=0)),
            budgets=budgets,
            lengths=lengths,
            seq_lens=seq_lens,
            tail_from=tail_from,
        )

    def observe(self, layer_id, req_index, band_logits, lse) -> None:
        self._rows[req_index] += self._dd_rows(band_logits, lse)

    def observe_step(self, layer_id, band_logits, lse) -> None:
        self._rows[:, 0] += self._dd_rows(band_logits, lse)

    def _dd_rows(self, band_logits: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
        """DD-Select rows [n, L] of n queries from their band [h, n, W] and lse [h, n], mean over heads."""
        rows = band_rows_from_logits(
            band_logits, lse, self.blocks.lookahead, self.blocks.local_window, self.blocks.alpha
        )
        return rows.mean(dim=0)

    def observe_queries(self, layer_id, req_index, q, scale) -> None:
        self.queries.add(req_index, layer_id, q, scale)

    def end_forward(self, reqs: list[RequestView], key_buffers: list[torch.Tensor]) -> None:
        t, cfg = self.table, self.blocks
        closed = 0
        for i, (r, rows) in enumerate(zip(reqs, self._rows)):
            new_slots = r.row_slots[r.new_start :]
            # A reused slot's old record is stale whatever path freed the slot.
            t.release_slots(new_slots)
            if cfg.uses_scores:
                t.band[new_slots] = rows / len(self.needs.score_layers)
            if self.candidate_mask is None:
                t.is_candidate[new_slots] = True
            else:
                ids = r.token_ids.to(self.candidate_mask.device).clamp(0, self.candidate_mask.numel() - 1)
                t.is_candidate[new_slots] = self.candidate_mask[ids]
            if self.by_type:
                self.token_ids[new_slots] = r.token_ids.to(self.token_ids.device)
            start = self._open_start(r, self._blocks_of(r, r.row_slots[: r.new_start]))
            blocks = []
            if decision_position(start, cfg) <= r.seq_len - 1:
                tail = r.row_slots[start:]
                blocks = split(
                    start,
                    r.seq_len,
                    t.band[tail],
                    t.is_candidate[tail],
                    cfg,
                    self.token_ids[tail] if self.by_type else None,
                    self._type_prior(r.row_slots, start) if self.by_type else None,
                )
                t.add_blocks(r.row_slots, blocks, key_buffers)
                closed += len(blocks)
            if self.queries is not None and not self._is_decode and self.answers(r):
                window = self.queries.take(i, r)
                if r.ends_prompt() and self.evicts:  # the prompt alone, as the prefill-time policies rank it
                    self._window_mass[r.row] = (r.rid, window_mass(r.prompt(), window, key_buffers))
                elif r.ends_prompt():
                    self._layer_budgets[r.row] = (r.rid, self._dynamickv_budgets(r.prompt(), window, key_buffers))
            # A line per request at least once its prompt is in (even all from the radix cache),
            # then whenever it closes blocks.
            if self._trace is not None and (
                blocks or (not self._is_decode and r.ends_prompt()) or r.seq_len - r.new_start > 1
            ):
                self._write_trace(r)
        metrics.blocks_closed(self.label or self.kv.policy, closed)

    def _type_prior(self, row_slots: torch.Tensor, start: int) -> dict:
        """Per delimiter type, (score sum, count) of the candidates before position `start`."""
        if start == 0:
            return {}
        slots = row_slots[: start + self.blocks.lookahead]
        scores = candidate_scores(self.table.band[slots[1:]], self.blocks.lookahead)
        return type_totals(scores, self.table.is_candidate[slots[:start]], self.token_ids[slots[:start]])

    def _dynamickv_budgets(self, r: RequestView, window: dict, key_buffers) -> list[int]:
        """DynamicKV's per-layer shares of num_layers * budget, each at least what every step keeps."""
        o, n, num_layers = LAYER_BUDGET_SCORING, r.seq_len, self.shape.num_layers
        floor = self.blocks.always_kept
        obs = min(o.window, n)
        if r.budget >= n or n <= obs or r.budget <= floor:
            return [r.budget] * num_layers
        scores = dynamickv_scores(r, window, key_buffers, obs, o.kernel_size, o.pooling)
        return [floor + b for b in dynamickv(scores, r.budget - floor, o.r_max, n - floor)]

    def _blocks_of(self, r: RequestView, row_slots: torch.Tensor) -> torch.Tensor:
        """Record ids [nb] of the closed blocks of request r's first row_slots.numel() positions, in
        order: those their decision slots own; after a compaction, the resident ones the row
        owns, then those closed since (decided by slots of the open tail or generated tokens)."""
        recs = self.table.blocks_of(row_slots)
        kept = self._row_records.get(r.row)
        if kept is None or kept.rid != r.rid:
            return recs
        return torch.cat([kept.records, recs[self.table.rec_start[recs] >= kept.open_from]])

    def _row_open_from(self, r: RequestView) -> int:
        """Where a compacted request's open block started (0 if it is not compacted). Read in
        place, its last resident block may end before that: the blocks between are not resident."""
        kept = self._row_records.get(r.row)
        return kept.open_from if kept is not None and kept.rid == r.rid else 0

    def _open_start(self, r: RequestView, recs: torch.Tensor) -> int:
        """First position of request r's open block, after its closed blocks recs (`_blocks_of`)."""
        return max(self.table.open_start(recs), self._row_open_from(r))

    def _write_trace(self, r: RequestView) -> None:
        recs = self._blocks_of(r, r.row_slots)
        blocks = torch.stack([self.table.rec_start[recs], self.table.rec_end[recs]], 1).tolist()
        event = {"event": "blocks", "rid": r.rid, "seq_len": r.seq_len, "blocks": blocks}
        if r.row in self._layer_budgets:
            event["layer_budgets"] = self._layer_budgets[r.row][1]
        self._trace.write(json.dumps(event) + "\n")

    # --- decode -----------------------------------------------------------------------------
    def layer_budget(self, r: RequestView, layer_id: int) -> int:
        rid, budgets = self._layer_budgets.get(r.row, (None, None))
        return budgets[layer_id] if budgets is not None and rid == r.rid else r.budget

    def select(self, layer_id, req_index, q):
        """The reference rule (`select_positions`), one request at a time."""
        step = self._blocks_now
        seq_len, budget = step.lengths[req_index], step.budgets[layer_id][req_index]
        if seq_len <= budget:
            return all_positions(seq_len, self.shape.num_kv_heads, q.device)
        t = self.table
        recs = step.records[req_index]
        recs = recs[recs >= 0]
        scores = score_blocks(q, t.kmin[layer_id].index_select(0, recs), t.kmax[layer_id].index_select(0, recs))
        tail_from = int(step.tail_from[req_index])
        return select_positions(
            scores, t.rec_start[recs], t.rec_end[recs], seq_len, self.blocks.sink_tokens, tail_from, budget
        )

    def select_batch(self, layer_id, req_indices, q):
        """`select` for several requests in one pass: their blocks scored together and the chosen
        ones gathered as runs of positions (`select_block_runs`, the same rule)."""
        index = torch.tensor(req_indices, device=q.device)
        positions, counts = self._select_runs(layer_id, tuple(req_indices), index, q)
        return positions, torch.arange(positions.shape[2], device=q.device) < counts[:, :, None]

    def _select_runs(
        self, layer_id: int, indices: tuple[int, ...], index: torch.Tensor, q: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions [S, KvH, W] and counts [S, KvH] of the step's requests `indices` (`index` [S]
        on the device; q [S, H, D] their queries)."""
        t, step = self.table, self._blocks_now
        if indices != tuple(range(len(step.lengths))):  # not every request in order: theirs
            step = step.rows(index)
        records = step.records.clamp_min(0)
        scores = score_blocks_batched(q, t.bounds_of(layer_id, t.kmin, records), t.bounds_of(layer_id, t.kmax, records))
        return select_block_runs(
            scores,
            step.first,
            step.cost,
            step.head,
            step.head_valid,
            step.tail,
            step.tail_valid,
            step.room[layer_id],
            step.run_len,
            step.most_taken,
        )

    def select_slots_batch(self, layer_id, sel, q):
        """The selection as KV slots, on the Triton kernel with the GPU selection on (`select_slots`
        scores, chooses and maps to slots for the whole batch in three launches: the same rule,
        scores summed in another order, so near-ties may go the other way)."""
        if self._gpu_selection:
            return self._select_slots_triton(layer_id, sel, q)
        positions, counts = self._select_runs(layer_id, sel.indices, sel.index, q)
        return sel.slots_at(positions), torch.arange(positions.shape[2], device=q.device) < counts[:, :, None]

    def selection_counts(self, layer_id, req_indices):
        """Selection fills the budget: min(layer budget, seq_len) slots per KV head."""
        step = self._blocks_now
        return [min(step.budgets[layer_id][i], step.lengths[i]) for i in req_indices]

    def use_gpu_selection(self, on: bool) -> None:
        self._gpu_selection = on

    def _select_slots_triton(self, layer_id: int, sel, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from dynsplit_sglang.kernels.block_select_triton import select_slots

        t, step, index = self.table, self._blocks_now, sel.index
        # Selection fills the budget, so the widest row is the largest min(budget, seq_len).
        width = max(self.selection_counts(layer_id, sel.indices))
        seq_lens = step.seq_lens.index_select(0, index)
        slots = torch.empty(len(sel), self.shape.num_kv_heads, width, dtype=torch.int64, device=q.device)
        counts = torch.empty(len(sel), self.shape.num_kv_heads, dtype=torch.int64, device=q.device)
        select_slots(
            q,
            t.kmin[layer_id],
            t.kmax[layer_id],
            step.records.index_select(0, index),
            t.rec_start,
            t.rec_end,
            sel.slots,
            seq_lens,
            torch.full_like(seq_lens, self.blocks.sink_tokens),
            step.tail_from.index_select(0, index),
            torch.tensor([step.budgets[layer_id][i] for i in sel.indices], device=seq_lens.device),
            slots,
            counts,
        )
        valid = torch.arange(width, device=q.device) < counts[:, :, None]
        return slots, valid

    # --- eviction (dynsplit_sglang/eviction.py, docs/design.md) ---------------------------------
    def resident_bound(self, budget: int, prompt_len: int) -> int | None:
        """`resident` x budget, and at least what the set always holds (the sink's and the
        recent window's blocks, the open tail)."""
        if not self.evicts:
            return None
        b = self.blocks
        floor = b.sink_tokens + b.recent_tokens + b.max_open_tail + 2 * b.max_block
        return min(prompt_len, max(math.ceil(self.options.resident * budget), floor))

    def closes_gap(self, r: RequestView) -> bool:
        return True

    def kept_positions(self, req_index, r, prefix=0):
        """The resident set, the same for every layer and KV head: whole blocks of the prompt and
        its open tail, chosen over the whole prompt whatever the radix hit (so a hit never
        changes what a request attends to): the blocks holding the sink and the recent window,
        the open tail (so decode closes the blocks it closes without eviction), then the blocks
        the prompt's last queries attend to most per token, while they fit in resident_bound.
        returns its positions at or after `prefix`, in order (the hit is read in place)."""
        p = r.prompt()
        n, t, cfg = p.seq_len, self.table, self.blocks
        _, mass = self._window_mass.pop(r.row)
        recs = self._blocks_of(r, p.row_slots)
        starts, ends = t.rec_start[recs], t.rec_end[recs]
        lengths = ends - starts + 1
        resident = torch.zeros(n, dtype=torch.bool, device=mass.device)
        resident[t.open_start(recs) :] = True  # the open tail
        must = (starts < cfg.sink_tokens) | (ends >= n - cfg.recent_tokens)
        free = self.resident_bound(r.budget, n) - int(resident.sum()) - int(lengths[must].sum())
        # The other blocks, best first, while they fit.
        order = block_order(mass, starts, ends, self.options.resident_rank)
        order = order[~must[order]]
        chosen = must.clone()
        chosen[order[lengths[order].cumsum(0) <= free]] = True
        for b_start, b_end in zip(starts[chosen].tolist(), ends[chosen].tolist()):
            resident[b_start : b_end + 1] = True
        self._resident[r.row] = (r.rid, resident)
        positions = torch.nonzero(resident[prefix:])[:, 0] + prefix
        return positions[None, None, :].expand(self.shape.num_layers, self.shape.num_kv_heads, -1)

    def compacted(self, req_index, r, prefix, kept, moved):
        """kept, moved: [L, KvH, K], the same for every layer and head (private positions before
        and after). From now on the request reads its resident blocks (RowRecords) and the blocks
        it closes later, not every block its slots own (the non-resident blocks of the hit stay
        in the tree for others, unread by this request)."""
        _, resident = self._resident.pop(r.row)
        self._take_blocks(r, prefix, kept[0, 0], moved[0, 0], resident)

    def follow_compaction(self, req_index, r, prefix, kept, moved):
        """Another policy of a PolicySet compacted the request (a decode-time one: its tokens are
        the same for every layer and head): this one keeps its blocks that stayed whole. The
        whole hit stays, read in place (no copies: with many variants and requests sharing one
        prompt, copying every member's hit records per request filled the host memory)."""
        held = torch.zeros(r.prompt_end, dtype=torch.bool, device=kept.device)
        held[:prefix] = True
        held[kept[0, 0]] = True
        self._take_blocks(r, prefix, kept[0, 0], moved[0, 0], held)

    def _take_blocks(self, r: RequestView, prefix: int, old, new, held) -> None:
        """old, new: [K] private positions before and after the move; held: [n] bool, the
        prompt positions the request keeps. The moved tokens' slot-keyed state (DD rows,
        candidate flags, token ids) moves with them into [new[0], n); the records the overwritten
        slots own are freed (no other request holds those slots); a record a slot in
        [prefix, new[0]) owns stays as it is (that KV goes to the radix tree untouched).
        The kept blocks that a slot of the hit owns are read in place (their positions do not
        move, and the hit stays locked while the request runs); the other kept blocks get
        row-owned copies of their records at their closed-up positions."""
        t, row, n = self.table, r.row_slots, r.prompt_end
        t.band[row[new]] = t.band[row[old]]
        t.is_candidate[row[new]] = t.is_candidate[row[old]]
        if self.token_ids is not None:
            self.token_ids[row[new]] = self.token_ids[row[old]]
        recs = self._blocks_of(r, row[:n])
        starts, ends = t.rec_start[recs], t.rec_end[recs]
        whole = held[starts] & held[ends]  # blocks are kept whole or not at all
        in_hit = torch.isin(recs, t.slot_record[row[:prefix]])
        kept = recs[whole]
        copy = ~in_hit[whole]
        copies = t.copy_records(kept[copy])
        t.rec_start[copies] = closed_up(starts[whole][copy], prefix, old)
        t.rec_end[copies] = closed_up(ends[whole][copy], prefix, old)
        kept[copy] = copies
        open_from = torch.tensor([t.open_start(recs)], device=old.device)
        open_from = int(closed_up(open_from, prefix, old))
        t.release_slots(row[n - old.numel() : n])
        self._row_records[r.row] = RowRecords(r.rid, kept, copies, open_from)

    # --- slot lifetime ------------------------------------------------------------------------
    def release_slots(self, slots: torch.Tensor) -> None:
        self.table.release_slots(slots)

    def release_rows(self, free_rows: set[int]) -> None:
        forget_rows(self._layer_budgets, free_rows)
        forget_rows(self._window_mass, free_rows)
        forget_rows(self._resident, free_rows)
        for row in [row for row in self._row_records if row in free_rows]:
            self.table.free_records.extend(self._row_records.pop(row).owned.tolist())
        if self.queries is not None:
            self.queries.release(free_rows)

    def reset(self) -> None:
        self.table.reset()
        self._layer_budgets.clear()
        self._window_mass.clear()
        self._resident.clear()
        self._row_records.clear()
        if self.queries is not None:
            self.queries.reset()

    def stats(self) -> dict:
        t = self.table
        carried = (
            {}
            if self.queries is None
            else {"carried_queries": len(self.queries), "layer_budgets": len(self._layer_budgets)}
        )
        return {
            "records_in_use": t.records_in_use,
            "records_owned": t.records_owned() + sum(kept.owned.numel() for kept in self._row_records.values()),
            "records_capacity": t.capacity,
            "resident_sets": len(self._resident),
            "window_masses": len(self._window_mass),
            **carried,
        }

    def trace(self, event: dict) -> None:
        if self._trace is not None:
            self._trace.write(json.dumps(event) + "\n")
