"""Slot-keyed side tables and the pool of uniform block records.

Everything here is indexed by physical KV slot, like the KV pool itself, so a radix-cache hit
reuses the prefix's DD-Select rows, delimiter flags and closed blocks with no tree changes. What a
slot holds depends only on tokens up to that slot's position (see splitter.py), so two requests
that share a prefix and then diverge can never see each other's later data.

Block records have a fixed size whatever the block's length (the "uniform mapping"): first and
last position plus per-layer, per-KV-head key min/max. A record belongs to the slot at its block's
decision position and is returned to the pool when that slot is freed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from dynsplit_sglang.kernels.block_summary import block_min_max

if TYPE_CHECKING:  # the policy module imports this one
    from dynsplit_sglang.policies.dynsplit import DynSplitOptions


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


class BlockTable:
    """Side tables for `num_slots` KV slots and a pool of block records.

    band:         [num_slots, lookahead] fp32 DD-Select rows of the token in each slot.
    is_candidate: [num_slots] bool, whether that token may end a block.
    slot_record:  [num_slots] int64 record decided at that slot, -1 if none.
    rec_start, rec_end: [capacity] int64 first/last position of each record's block.
    kmin, kmax:   [num_layers, capacity, KvH, D] key bounds of each record's block.
    """

    def __init__(self, num_slots: int, shape: ModelShape, cfg: DynSplitOptions, dtype: torch.dtype, device):
        self.cfg = cfg
        self.shape = shape
        self.dtype = dtype
        self.device = device
        self.band = torch.zeros(num_slots, cfg.lookahead, dtype=torch.float32, device=device)
        self.is_candidate = torch.zeros(num_slots, dtype=torch.bool, device=device)
        self.slot_record = torch.full((num_slots,), -1, dtype=torch.int64, device=device)
        # Every sequence has at most one decision per min_block tokens, plus one per sequence.
        self.capacity = 0
        self._grow(num_slots // cfg.min_block + 64)

    def _grow(self, capacity: int) -> None:
        s = self.shape
        old = self.capacity
        new_free = list(range(capacity - 1, old - 1, -1))
        if old == 0:
            self.rec_start = torch.zeros(capacity, dtype=torch.int64, device=self.device)
            self.rec_end = torch.zeros(capacity, dtype=torch.int64, device=self.device)
            self.kmin = torch.zeros(
                s.num_layers, capacity, s.num_kv_heads, s.head_dim, dtype=self.dtype, device=self.device
            )
            self.kmax = torch.zeros_like(self.kmin)
            self.free_records: list[int] = new_free
        else:
            pad = capacity - old
            self.rec_start = torch.cat([self.rec_start, self.rec_start.new_zeros(pad)])
            self.rec_end = torch.cat([self.rec_end, self.rec_end.new_zeros(pad)])
            self.kmin = torch.cat([self.kmin, self.kmin.new_zeros(s.num_layers, pad, s.num_kv_heads, s.head_dim)], 1)
            self.kmax = torch.cat([self.kmax, self.kmax.new_zeros(s.num_layers, pad, s.num_kv_heads, s.head_dim)], 1)
            self.free_records = new_free + self.free_records
        self.capacity = capacity

    # --- accounting -------------------------------------------------------------------------
    @property
    def records_in_use(self) -> int:
        return self.capacity - len(self.free_records)

    def records_owned(self) -> int:
        """Records that some slot owns; equals records_in_use unless something leaked."""
        return int((self.slot_record >= 0).sum())

    def release_slots(self, slots: torch.Tensor) -> None:
        """The allocator freed these slots: return the records they own to the pool."""
        if slots.numel() == 0:
            return
        slots = slots.to(self.device, torch.int64)
        recs = self.slot_record[slots]
        owned = recs >= 0
        if bool(owned.any()):
            self.free_records.extend(recs[owned].tolist())
            self.slot_record[slots[owned]] = -1

    def reset(self) -> None:
        """The whole KV pool was cleared (cache flush)."""
        self.slot_record.fill_(-1)
        self.free_records = list(range(self.capacity - 1, -1, -1))

    # --- blocks of a sequence ---------------------------------------------------------------
    def blocks_of(self, row_slots: torch.Tensor) -> torch.Tensor:
        """Record ids of the closed blocks of a sequence, in order.

        row_slots: [n] KV slots of positions 0 .. n-1 of the sequence.
        returns:   [nb] int64 record ids.
        """
        recs = self.slot_record[row_slots]
        return recs[recs >= 0]

    def open_start(self, recs: torch.Tensor) -> int:
        """First position of the open block after a sequence's closed blocks recs [nb] (in order)."""
        return 0 if recs.numel() == 0 else int(self.rec_end[recs[-1]]) + 1

    @staticmethod
    def bounds_of(layer: int, bounds: torch.Tensor, records: torch.Tensor) -> torch.Tensor:
        """One layer's key bounds (`kmin` or `kmax`) of records [...]: [..., KvH, D]. Whole rows
        by `index_select`, several times faster on the CPU than indexing the 4-D table."""
        table = bounds[layer]
        rows = table.view(table.shape[0], -1).index_select(0, records.reshape(-1))
        return rows.view(*records.shape, *table.shape[1:])

    def copy_records(self, recs: torch.Tensor) -> torch.Tensor:
        """New records [k] holding what recs [k] hold (positions and key bounds); no slot owns them."""
        if recs.numel() == 0:
            return recs
        if len(self.free_records) < recs.numel():
            self._grow(max(self.capacity * 3 // 2, self.capacity + recs.numel()))
        copies = torch.tensor(
            [self.free_records.pop() for _ in range(recs.numel())], dtype=torch.int64, device=self.device
        )
        self.rec_start[copies] = self.rec_start[recs]
        self.rec_end[copies] = self.rec_end[recs]
        self.kmin[:, copies] = self.kmin[:, recs]
        self.kmax[:, copies] = self.kmax[:, recs]
        return copies

    def add_blocks(self, row_slots: torch.Tensor, blocks, key_buffers) -> None:
        """Create the records of newly closed blocks and their key summaries for every layer.

        row_slots:   [n] KV slots of the sequence's positions 0 .. n-1 (covers every decision).
        blocks:      list of splitter.Block.
        key_buffers: per layer, [num_slots, KvH, D] key buffer of the KV pool.
        """
        if not blocks:
            return
        if len(self.free_records) < len(blocks):
            self._grow(max(self.capacity * 3 // 2, self.capacity + len(blocks)))
        rec_ids = [self.free_records.pop() for _ in blocks]
        recs = torch.tensor(rec_ids, dtype=torch.int64, device=self.device)
        starts = torch.tensor([b.start for b in blocks], dtype=torch.int64, device=self.device)
        ends = torch.tensor([b.end for b in blocks], dtype=torch.int64, device=self.device)
        lengths = ends - starts + 1
        width = int(lengths.max())
        pos = (starts[:, None] + torch.arange(width, device=self.device)[None, :]).minimum(ends[:, None])
        slots = row_slots[pos].to(torch.int64)
        for layer, keys in enumerate(key_buffers):
            kmin, kmax = block_min_max(keys, slots, lengths)
            self.kmin[layer, recs] = kmin
            self.kmax[layer, recs] = kmax
        self.rec_start[recs] = starts
        self.rec_end[recs] = ends
        decided = torch.tensor([b.decided_at for b in blocks], dtype=torch.int64, device=self.device)
        self.slot_record[row_slots[decided].to(torch.int64)] = recs
