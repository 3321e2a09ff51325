"""DynSplit-KV: semantic blocks chosen by DD-Select, uniform block records, top-k at decode."""

from __future__ import annotations

import json
from typing import Optional

import torch

from dynsplit_sglang.block_table import BlockTable, ModelShape
from dynsplit_sglang.config import DynSplitConfig, KVConfig
from dynsplit_sglang.kernels.block_select import score_blocks, select_positions
from dynsplit_sglang.kernels.dd_select import band_rows_from_logits
from dynsplit_sglang.policies.base import KVPolicy, RequestView
from dynsplit_sglang.splitter import split


def default_score_layers(num_layers: int, count: int = 4) -> tuple[int, ...]:
    """`count` layers spread evenly over the middle half of the model."""
    lo, hi = num_layers // 4, max(num_layers // 4 + 1, (3 * num_layers) // 4)
    if hi - lo <= count:
        return tuple(range(lo, hi))
    step = (hi - lo) / count
    return tuple(sorted({lo + int(step * i + step / 2) for i in range(count)}))


class DynSplitPolicy(KVPolicy):
    name = "dynsplit"

    def __init__(
        self,
        kv: KVConfig,
        shape: ModelShape,
        num_slots: int,
        dtype: torch.dtype,
        device,
        candidate_mask: Optional[torch.Tensor] = None,
    ):
        super().__init__(kv, shape, num_slots, dtype, device)
        cfg: DynSplitConfig = kv.dynsplit
        self.cfg = cfg
        layers = cfg.score_layers or default_score_layers(shape.num_layers)
        bad = [l for l in layers if l >= shape.num_layers]
        if bad:
            raise ValueError(f"--dynsplit-config: score_layers {bad} do not exist (the model has {shape.num_layers} layers)")
        self._score_layers = frozenset(layers)
        if cfg.score_heads is not None and max(cfg.score_heads) >= shape.num_heads:
            raise ValueError(f"--dynsplit-config: score_heads {list(cfg.score_heads)} do not exist (the model has {shape.num_heads} query heads)")
        self._score_heads = None if cfg.score_heads is None else torch.tensor(cfg.score_heads, device=device)
        self.table = BlockTable(num_slots, shape, cfg, dtype, device)
        # [vocab] bool; None means every token is a candidate.
        self.candidate_mask = None if candidate_mask is None else candidate_mask.to(device)
        self._trace = open(cfg.trace_path, "a", buffering=1) if cfg.trace_path else None
        self._rows: list[torch.Tensor] = []  # per request: [n, L] sum of DD rows over score layers
        self._decode_blocks: list[tuple] = []  # per request: (record ids, starts, ends, tail start, seq_len)

    # --- statistics --------------------------------------------------------------------------
    def score_layers(self) -> frozenset[int]:
        return self._score_layers

    def band_width(self) -> int:
        return self.cfg.band

    def score_heads(self) -> Optional[torch.Tensor]:
        return self._score_heads

    def begin_forward(self, reqs: list[RequestView], is_decode: bool) -> None:
        L = self.cfg.lookahead
        self._rows = [torch.zeros(r.seq_len - r.new_start, L, device=r.row_slots.device) for r in reqs]
        if is_decode:
            self._decode_blocks = []
            for r in reqs:
                recs = self.table.blocks_of(r.row_slots)
                starts, ends = self.table.rec_start[recs], self.table.rec_end[recs]
                tail = 0 if recs.numel() == 0 else int(ends[-1]) + 1
                self._decode_blocks.append((recs, starts, ends, tail, r.seq_len))

    def observe(self, layer_id, req_index, band_logits, lse) -> None:
        rows = band_rows_from_logits(band_logits, lse, self.cfg.lookahead, self.cfg.local_window, self.cfg.alpha)
        self._rows[req_index] += rows.mean(dim=0)

    def end_forward(self, reqs: list[RequestView], key_buffers: list[torch.Tensor]) -> None:
        t = self.table
        for r, rows in zip(reqs, self._rows):
            new_slots = r.row_slots[r.new_start :]
            # A reused slot's old record is stale whatever path freed the slot.
            t.release_slots(new_slots)
            t.band[new_slots] = rows / len(self._score_layers)
            if self.candidate_mask is None:
                t.is_candidate[new_slots] = True
            else:
                ids = r.token_ids.clamp(0, self.candidate_mask.numel() - 1)
                t.is_candidate[new_slots] = self.candidate_mask[ids]
            start = t.open_start(r.row_slots[: r.new_start])
            blocks = split(start, r.seq_len, t.band[r.row_slots[start:]], t.is_candidate[r.row_slots[start:]], self.cfg)
            t.add_blocks(r.row_slots, blocks, key_buffers)
            if self._trace is not None and (blocks or r.new_start == 0 or r.seq_len - r.new_start > 1):
                self._write_trace(r)

    def _write_trace(self, r: RequestView) -> None:
        recs = self.table.blocks_of(r.row_slots)
        blocks = torch.stack([self.table.rec_start[recs], self.table.rec_end[recs]], 1).tolist()
        self._trace.write(json.dumps({"event": "blocks", "rid": r.rid, "seq_len": r.seq_len, "blocks": blocks}) + "\n")

    # --- decode -----------------------------------------------------------------------------
    def select(self, layer_id, req_index, q):
        recs, starts, ends, tail, seq_len = self._decode_blocks[req_index]
        t = self.table
        scores = score_blocks(q, t.kmin[layer_id].index_select(0, recs), t.kmax[layer_id].index_select(0, recs))
        keep_tail_from = max(0, min(tail, seq_len - self.cfg.recent_tokens))
        return select_positions(scores, starts, ends, seq_len, self.cfg.sink_tokens, keep_tail_from, self.budget)

    # --- slot lifetime ------------------------------------------------------------------------
    def release_slots(self, slots: torch.Tensor) -> None:
        self.table.release_slots(slots)

    def reset(self) -> None:
        self.table.reset()

    def stats(self) -> dict:
        t = self.table
        return {"records_in_use": t.records_in_use, "records_owned": t.records_owned(), "records_capacity": t.capacity}

    def trace(self, event: dict) -> None:
        if self._trace is not None:
            self._trace.write(json.dumps(event) + "\n")
