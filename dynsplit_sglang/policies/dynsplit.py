"""DynSplit-KV: semantic blocks chosen by DD-Select, uniform block records, top-k at decode."""

from __future__ import annotations

import json
from typing import Optional

import torch

from dynsplit_sglang.block_table import BlockTable, ModelShape
from dynsplit_sglang.config import DynamicKVOptions, DynSplitConfig, KVConfig
from dynsplit_sglang.delimiters import candidate_token_mask
from dynsplit_sglang.kernels.block_select import score_blocks, select_positions, select_positions_batched
from dynsplit_sglang.kernels.dd_select import band_rows_from_logits, candidate_scores
from dynsplit_sglang.layer_budgets import dynamickv
from dynsplit_sglang.policies.base import KVPolicy, RequestView, forget_rows
from dynsplit_sglang.policies.dynamickv import dynamickv_scores
from dynsplit_sglang.policies.prefill_selection import PromptQueries
from dynsplit_sglang.splitter import decision_position, split, type_totals

# DynamicKV's own defaults, used when `layer_budgets` is "dynamickv".
LAYER_BUDGET_SCORING = DynamicKVOptions()


def default_score_layers(num_layers: int, count: int = 4) -> tuple[int, ...]:
    """`count` layers spread evenly over the middle half of the model."""
    lo, hi = num_layers // 4, max(num_layers // 4 + 1, (3 * num_layers) // 4)
    if hi - lo <= count:
        return tuple(range(lo, hi))
    step = (hi - lo) / count
    return tuple(sorted({lo + int(step * i + step / 2) for i in range(count)}))


class DynSplitPolicy(KVPolicy):
    name = "dynsplit"

    def __init__(self, kv: KVConfig, shape: ModelShape, num_slots: int, dtype: torch.dtype, device, tokens=None):
        super().__init__(kv, shape, num_slots, dtype, device, tokens)
        cfg: DynSplitConfig = kv.options
        self.cfg = cfg
        layers = (cfg.score_layers or default_score_layers(shape.num_layers)) if cfg.uses_scores else ()
        bad = [l for l in layers if l >= shape.num_layers]
        if bad:
            raise ValueError(f"--kv-config: score_layers {bad} do not exist (the model has {shape.num_layers} layers)")
        self._score_layers = frozenset(layers)
        if cfg.score_heads is not None and max(cfg.score_heads) >= shape.num_heads:
            raise ValueError(f"--kv-config: score_heads {list(cfg.score_heads)} do not exist (the model has {shape.num_heads} query heads)")
        self._score_heads = None if cfg.score_heads is None else torch.tensor(cfg.score_heads, device=device)
        self.table = BlockTable(num_slots, shape, cfg, dtype, device)
        vocab = tokens.vocab_size if tokens is not None else 1
        # [vocab] bool; None means every token is a candidate.
        self.candidate_mask = None if cfg.candidates == "all" else candidate_token_mask(tokens, cfg.candidates, vocab, cfg.delimiter_chars).to(device)
        self.by_type = cfg.uses_scores and cfg.weighting == "delimiter_type"
        self.token_ids = torch.zeros(num_slots, dtype=torch.int64, device=device) if self.by_type else None
        self.queries = PromptQueries(self.query_window()) if cfg.layer_budgets == "dynamickv" else None
        self._layer_budgets: dict[int, tuple[Optional[str], list[int]]] = {}  # row -> (rid, budgets)
        self._trace = open(cfg.trace_path, "a", buffering=1) if cfg.trace_path else None
        self._reqs: list[RequestView] = []
        self._is_decode = False
        self._rows: list[torch.Tensor] = []  # per request: [n, L] sum of DD rows over score layers
        self._gpu_selection = False  # select_slots_batch on the Triton kernel ($DYNSPLIT_SELECTION)
        self._decode_blocks: list[tuple] = []  # per request: (record ids, starts, ends, tail start, seq_len)

    # --- statistics --------------------------------------------------------------------------
    def score_layers(self) -> frozenset[int]:
        return self._score_layers

    def band_width(self) -> int:
        return self.cfg.band

    def score_heads(self) -> Optional[torch.Tensor]:
        return self._score_heads

    def query_layers(self) -> frozenset[int]:
        return frozenset(range(self.shape.num_layers)) if self.queries is not None else frozenset()

    def query_window(self) -> int:
        return LAYER_BUDGET_SCORING.window if self.cfg.layer_budgets == "dynamickv" else 0

    def begin_forward(self, reqs: list[RequestView], is_decode: bool) -> None:
        self._reqs = reqs
        self._is_decode = is_decode
        L = self.cfg.lookahead
        self._rows = [torch.zeros(r.seq_len - r.new_start, L, device=r.row_slots.device) for r in reqs]
        if self.queries is not None and is_decode:
            self.queries.end_prompt(r.row for r in reqs)
        elif self.queries is not None:
            self.queries.begin(len(reqs))
        if is_decode:
            self._decode_blocks = []
            for r in reqs:
                recs = self.table.blocks_of(r.row_slots)
                starts, ends = self.table.rec_start[recs], self.table.rec_end[recs]
                tail = 0 if recs.numel() == 0 else int(ends[-1]) + 1
                self._decode_blocks.append((recs, starts, ends, tail, r.seq_len))
            self._step = self._step_tensors(reqs)

    def _step_tensors(self, reqs: list[RequestView]) -> dict:
        """What `select_batch` needs for every request of a decode step, built once per step:
        records [n, NB] (-1 padded), seq_lens, keep_tail_from [n] int64."""
        device = self.table.rec_start.device
        num_blocks = max((b[0].numel() for b in self._decode_blocks), default=0)
        records = torch.full((len(reqs), num_blocks), -1, dtype=torch.int64, device=device)
        for k, (recs, *_rest) in enumerate(self._decode_blocks):
            records[k, : recs.numel()] = recs
        seq_lens = [b[4] for b in self._decode_blocks]
        tail_from = [max(0, min(b[3], b[4] - self.cfg.recent_tokens)) for b in self._decode_blocks]
        return {"records": records, "seq_lens": torch.tensor(seq_lens, device=device),
                "keep_tail_from": torch.tensor(tail_from, device=device), "max_len": max(seq_lens, default=0)}

    def observe(self, layer_id, req_index, band_logits, lse) -> None:
        rows = band_rows_from_logits(band_logits, lse, self.cfg.lookahead, self.cfg.local_window, self.cfg.alpha)
        self._rows[req_index] += rows.mean(dim=0)

    def observe_queries(self, layer_id, req_index, q, scale) -> None:
        self.queries.add(req_index, layer_id, q, scale)

    def end_forward(self, reqs: list[RequestView], key_buffers: list[torch.Tensor]) -> None:
        t, cfg = self.table, self.cfg
        for i, (r, rows) in enumerate(zip(reqs, self._rows)):
            new_slots = r.row_slots[r.new_start :]
            # A reused slot's old record is stale whatever path freed the slot.
            t.release_slots(new_slots)
            if cfg.uses_scores:
                t.band[new_slots] = rows / len(self._score_layers)
            if self.candidate_mask is None:
                t.is_candidate[new_slots] = True
            else:
                ids = r.token_ids.to(self.candidate_mask.device).clamp(0, self.candidate_mask.numel() - 1)
                t.is_candidate[new_slots] = self.candidate_mask[ids]
            if self.by_type:
                self.token_ids[new_slots] = r.token_ids.to(self.token_ids.device)
            start = t.open_start(r.row_slots[: r.new_start])
            blocks = []
            if decision_position(start, cfg) <= r.seq_len - 1:
                tail = r.row_slots[start:]
                blocks = split(
                    start, r.seq_len, t.band[tail], t.is_candidate[tail], cfg,
                    self.token_ids[tail] if self.by_type else None,
                    self._type_prior(r.row_slots, start) if self.by_type else None,
                )
                t.add_blocks(r.row_slots, blocks, key_buffers)
            if self.queries is not None and not self._is_decode and self.answers(r):
                window = self.queries.take(i, r)
                if r.ends_prompt():  # the prompt alone, as the prefill-time policies rank it
                    self._layer_budgets[r.row] = (r.rid, self._dynamickv_budgets(r.prompt(), window, key_buffers))
            # A line per request at least once its prompt is in (even all from the radix cache),
            # then whenever it closes blocks.
            if self._trace is not None and (blocks or (not self._is_decode and r.ends_prompt())
                                          or r.seq_len - r.new_start > 1):
                self._write_trace(r)

    def _type_prior(self, row_slots: torch.Tensor, start: int) -> dict:
        """Per delimiter type, (score sum, count) of the candidates before position `start`."""
        if start == 0:
            return {}
        slots = row_slots[: start + self.cfg.lookahead]
        scores = candidate_scores(self.table.band[slots[1:]], self.cfg.lookahead)
        return type_totals(scores, self.table.is_candidate[slots[:start]], self.token_ids[slots[:start]])

    def _dynamickv_budgets(self, r: RequestView, window: dict, key_buffers) -> list[int]:
        """DynamicKV's per-layer shares of num_layers * budget, each at least what every step keeps."""
        o, n, num_layers = LAYER_BUDGET_SCORING, r.seq_len, self.shape.num_layers
        floor = self.cfg.always_kept
        obs = min(o.window, n)
        if r.budget >= n or n <= obs or r.budget <= floor:
            return [r.budget] * num_layers
        scores = dynamickv_scores(r, window, key_buffers, obs, o.kernel_size, o.pooling)
        return [floor + b for b in dynamickv(scores, r.budget - floor, o.r_max, n - floor)]

    def _write_trace(self, r: RequestView) -> None:
        recs = self.table.blocks_of(r.row_slots)
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
        recs, starts, ends, tail, seq_len = self._decode_blocks[req_index]
        budget = self.layer_budget(self._reqs[req_index], layer_id)
        if seq_len <= budget:
            positions = torch.arange(seq_len, device=q.device)[None, :].expand(self.shape.num_kv_heads, -1)
            return positions, torch.ones_like(positions, dtype=torch.bool)
        t = self.table
        scores = score_blocks(q, t.kmin[layer_id].index_select(0, recs), t.kmax[layer_id].index_select(0, recs))
        keep_tail_from = max(0, min(tail, seq_len - self.cfg.recent_tokens))
        return select_positions(scores, starts, ends, seq_len, self.cfg.sink_tokens, keep_tail_from, budget)

    def select_batch(self, layer_id, req_indices, q):
        """`select` for several requests: the same scores (request by request, so bit for bit
        those of `select`) and one batched selection (`select_positions_batched`, same rule)."""
        t, step = self.table, self._step
        rows = torch.tensor(req_indices, device=t.rec_start.device)
        records = step["records"].index_select(0, rows)
        scores = torch.zeros(len(req_indices), self.shape.num_kv_heads, records.shape[1], device=q.device)
        for k, i in enumerate(req_indices):
            recs = self._decode_blocks[i][0]
            if recs.numel():
                scores[k, :, : recs.numel()] = score_blocks(
                    q[k], t.kmin[layer_id].index_select(0, recs), t.kmax[layer_id].index_select(0, recs)
                )
        budgets = torch.tensor([self.layer_budget(self._reqs[i], layer_id) for i in req_indices], device=rows.device)
        seq_lens = step["seq_lens"].index_select(0, rows)
        positions, counts = select_positions_batched(
            scores, records, t.rec_start, t.rec_end, seq_lens, torch.full_like(seq_lens, self.cfg.sink_tokens),
            step["keep_tail_from"].index_select(0, rows), budgets, step["max_len"],
        )
        valid = torch.arange(positions.shape[2], device=positions.device) < counts[:, :, None]
        return positions, valid

    def use_gpu_selection(self, on: bool) -> None:
        self._gpu_selection = on

    def selection_counts(self, layer_id, req_indices):
        """Selection fills the budget: min(layer budget, seq_len) slots per KV head."""
        return [min(self.layer_budget(self._reqs[i], layer_id), self._decode_blocks[i][4]) for i in req_indices]

    def select_slots_batch(self, layer_id, req_indices, q, req_slots):
        """With the GPU selection on: the Triton kernel `select_slots` scores, chooses and maps to
        slots for the whole batch in three launches (the same rule as `select_batch`; scores
        summed in another order, so near-ties may go the other way)."""
        if not self._gpu_selection:
            return super().select_slots_batch(layer_id, req_indices, q, req_slots)
        from dynsplit_sglang.kernels.block_select_triton import select_slots

        t, step = self.table, self._step
        rows = torch.tensor(req_indices, device=t.rec_start.device)
        budgets = [self.layer_budget(self._reqs[i], layer_id) for i in req_indices]
        # Selection fills the budget, so the widest row is the largest min(budget, seq_len).
        width = max(min(b, self._decode_blocks[i][4]) for b, i in zip(budgets, req_indices))
        seq_lens = step["seq_lens"].index_select(0, rows)
        slots = torch.empty(len(req_indices), self.shape.num_kv_heads, width, dtype=torch.int64, device=q.device)
        counts = torch.empty(len(req_indices), self.shape.num_kv_heads, dtype=torch.int64, device=q.device)
        select_slots(
            q, t.kmin[layer_id], t.kmax[layer_id], step["records"].index_select(0, rows), t.rec_start, t.rec_end,
            req_slots.to(torch.int64), seq_lens, torch.full_like(seq_lens, self.cfg.sink_tokens),
            step["keep_tail_from"].index_select(0, rows), torch.tensor(budgets, device=seq_lens.device), slots, counts,
        )
        valid = torch.arange(width, device=q.device) < counts[:, :, None]
        return slots, valid

    # --- slot lifetime ------------------------------------------------------------------------
    def release_slots(self, slots: torch.Tensor) -> None:
        self.table.release_slots(slots)

    def release_rows(self, free_rows: set[int]) -> None:
        forget_rows(self._layer_budgets, free_rows)
        if self.queries is not None:
            self.queries.release(free_rows)

    def reset(self) -> None:
        self.table.reset()
        self._layer_budgets.clear()
        if self.queries is not None:
            self.queries.reset()

    def stats(self) -> dict:
        t = self.table
        carried = {} if self.queries is None else {"carried_queries": len(self.queries), "layer_budgets": len(self._layer_budgets)}
        return {"records_in_use": t.records_in_use, "records_owned": t.records_owned(), "records_capacity": t.capacity, **carried}

    def trace(self, event: dict) -> None:
        if self._trace is not None:
            self._trace.write(json.dumps(event) + "\n")
