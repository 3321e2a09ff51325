"""What KV compression did for each request: per decode step, the KV tokens it attended, those it
held in the pool and its context (what dense attention would hold and read); the prompt tokens
eviction gave back and the KV tokens resident at the end.

Read once per request, when its last output goes out: for its response (`meta_info`, see
patches/kv_observability.py) and for the server's metrics (metrics.py). Held tokens are known on
the host at every step; attended ones come from the selections, on the device, and are summed
there per req_to_token row, so a decode step reads nothing back for them: the sums are read when
requests end, with their outputs.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from dynsplit_sglang import metrics
from dynsplit_sglang.decode_step import DecodeStep


@dataclass(frozen=True)
class RequestCompression:
    """One request's figures.

    attended_tokens: KV tokens it attended, summed over its decode steps, each step's the mean
                     over layers and KV heads.
    held_tokens:     KV tokens it held in the pool, summed over its decode steps.
    context_tokens:  its sequence length, summed over its decode steps.
    resident_tokens: KV tokens it held at its last forward.
    evicted_tokens:  prompt tokens its eviction gave back to SGLang.
    """

    rid: str | None
    policy: str
    budget: int
    evict: bool
    decode_steps: int
    attended_tokens: float
    held_tokens: int
    context_tokens: int
    resident_tokens: int
    evicted_tokens: int

    def meta_info(self) -> dict:
        """The response's `meta_info["kv_compression"][0]` (means are None without a decode step)."""
        steps = self.decode_steps
        return {
            "policy": self.policy,
            "budget": self.budget,
            "evict": self.evict,
            "decode_steps": steps,
            "mean_attended_tokens": round(self.attended_tokens / steps, 2) if steps else None,
            "mean_held_tokens": round(self.held_tokens / steps, 2) if steps else None,
            "resident_tokens": self.resident_tokens,
            "evicted_tokens": self.evicted_tokens,
        }


@dataclass
class _Running:
    """A request's figures so far (its attended tokens are on the device)."""

    rid: str | None
    policy: str
    budget: int
    evict: bool
    steps: int = 0
    held: int = 0
    context: int = 0
    resident: int = 0
    evicted: int = 0


class CompressionStats:
    """Per req_to_token row, the figures of the request in it (one per scheduler process)."""

    def __init__(self, num_rows: int, num_layers: int, device):
        self.num_layers = num_layers
        # [rows] float64: per row, KV tokens attended summed over decode steps and layers (each
        # layer's the mean over KV heads); zeroed when a request takes the row
        self._attended = torch.zeros(num_rows, dtype=torch.float64, device=device)
        self._rows: dict[int, _Running] = {}
        self._lock = threading.Lock()

    def begin(self, row: int, rid: str | None, policy: str, budget: int, evict: bool) -> None:
        """A request takes the row (a new one, or one retracted and prefilled again)."""
        with self._lock:
            left = self._take([row] if row in self._rows else [])
            self._rows[row] = _Running(rid, policy, budget, evict)
            self._attended[row] = 0
        metrics.requests_ended(left)

    def forward(self, row: int, seq_len: int, evicted: int, is_decode: bool) -> None:
        """A forward of the row's request, whose sequence is seq_len tokens long and whose eviction
        gave `evicted` of them back."""
        r = self._rows.get(row)
        if r is None:
            return
        r.resident, r.evicted = seq_len - evicted, evicted
        if is_decode:
            r.steps += 1
            r.held += seq_len - evicted
            r.context += seq_len

    def dense(self, step: DecodeStep) -> None:
        """A decode step's dense layers: each request attends its whole view there."""
        tokens = [n * d for n, d in zip(step.lengths, step.dense_layers)]
        if any(tokens):
            self._attended.index_add_(0, step.rows, torch.tensor(tokens, dtype=torch.float64, device=step.rows.device))

    def selected(self, rows: torch.Tensor, valid: torch.Tensor) -> None:
        """A layer's selection: rows [S] int64 the requests' rows, valid [S, KvH, W] bool."""
        self._attended.index_add_(0, rows, valid.sum((1, 2), dtype=torch.float64) / valid.shape[1])

    def end(self, rids: list[str]) -> dict[str, RequestCompression]:
        """The figures of these requests, whose last outputs go out now (one device read for all);
        they are forgotten here and counted in the metrics."""
        wanted = set(rids)
        with self._lock:
            done = self._take([row for row, r in self._rows.items() if r.rid in wanted])
        metrics.requests_ended(done)
        return {c.rid: c for c in done}

    def drop(self, rows: set[int]) -> None:
        """These rows' requests left without a last output (retracted, or aborted before one):
        counted in the metrics only."""
        with self._lock:
            left = self._take([row for row in self._rows if row in rows])
        metrics.requests_ended(left)

    def reset(self) -> None:
        with self._lock:
            self._rows.clear()

    def __len__(self) -> int:
        return len(self._rows)

    def _take(self, rows: list[int]) -> list[RequestCompression]:
        if not rows:
            return []
        attended = self._attended[rows].tolist()
        out = []
        for row, a in zip(rows, attended):
            r = self._rows.pop(row)
            out.append(
                RequestCompression(
                    r.rid,
                    r.policy,
                    r.budget,
                    r.evict,
                    r.steps,
                    a / self.num_layers,
                    r.held,
                    r.context,
                    r.resident,
                    r.evicted,
                )
            )
        return out


_stats: CompressionStats | None = None


def install(stats: CompressionStats | None) -> None:
    """The attention backend's figures, for the output hook in the same (scheduler) process."""
    global _stats
    _stats = stats


def current() -> CompressionStats | None:
    return _stats
