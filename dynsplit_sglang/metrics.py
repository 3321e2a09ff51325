"""Prometheus metrics of KV compression, in SGLang's style, on its /metrics (`--enable-metrics`).

They exist only on a server whose `--kv` is not `full`, in each scheduler process, created with
SGLang's own scheduler metrics (patches/kv_observability.py hooks the collector's constructor):
the `sglang:` prefix, SGLang's labels (model_name, engine_type, tp_rank, ...) and one more,
`kv_policy` (the request's policy: `--kv`, or a `--kv-variants` label, so bounded by the config).

Names (prefix `sglang:kv_compression_`, beside SGLang's own `sglang:kv_*` pool gauges):
- attended_tokens_total  KV tokens decode steps attended (per step: the mean over layers and KV
                         heads), summed over steps and requests.
- held_tokens_total      KV tokens the same steps' requests held in the pool.
- context_tokens_total   their sequence lengths: what dense attention would hold and read.
                         attended / context is the compression of a step's reads, held / context
                         that of the pool (ratios of the counters' rates).
- evicted_tokens_total   prompt tokens eviction gave back to SGLang.
- blocks_closed_total    blocks DynSplit's splitter closed (policy dynsplit).
- selection_seconds      time a decode step spent selecting, all layers (a histogram).

Nothing here reads the device: attended and held tokens are added when a request ends (its
figures are read with its last output, compression_stats.py), the others as the host learns them;
the selection time is measured off the device's queue (`SelectionClock`).

prometheus_client is imported only inside `install`: it picks its multiprocess mode at its first
import, and SGLang sets PROMETHEUS_MULTIPROC_DIR after plugins load; an import at plugin load
would make SGLang's own tokenizer metrics vanish.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from dynsplit_sglang.compression_stats import RequestCompression

# 50 us .. ~2.6 s: a step's selection, from a small GPU batch to a long CPU one
SELECTION_BUCKETS = tuple(round(5e-5 * 2**k, 7) for k in range(16))


# counter name (after "sglang:kv_compression_", before "_total") -> its help text
COUNTERS = {
    "attended_tokens": "KV tokens attended by decode steps (mean over layers and KV heads), summed over steps.",
    "held_tokens": "KV tokens held in the pool by the requests of the same decode steps, summed over steps.",
    "context_tokens": "Sequence length of the requests of the same decode steps, summed over steps.",
    "evicted_tokens": "Prompt KV tokens eviction gave back to the pool or the radix tree.",
    "blocks_closed": "Blocks closed by DynSplit's splitter.",
}


class KVMetrics:
    """The metric objects of one scheduler process."""

    def __init__(self, collector):
        from prometheus_client import Counter, Histogram

        counter = collector._counter_cls or Counter
        histogram = collector._histogram_cls or Histogram
        self.labels = dict(collector.labels)
        names = list(self.labels) + ["kv_policy"]
        self.counters = {
            key: counter(name=f"sglang:kv_compression_{key}", documentation=text, labelnames=names)
            for key, text in COUNTERS.items()
        }
        self.selection = histogram(
            name="sglang:kv_compression_selection_seconds",
            documentation="Time a decode step spent selecting KV (all layers).",
            labelnames=names,
            buckets=SELECTION_BUCKETS,
        )

    def add(self, key: str, policy: str, amount: float) -> None:
        self.counters[key].labels(**self.labels, kv_policy=policy).inc(amount)


_metrics: KVMetrics | None = None


def install(collector, server_args) -> None:
    """Create the metrics next to SGLang's scheduler collector (once per process), if --kv
    compresses."""
    global _metrics
    if _metrics is None and getattr(server_args, "_kv_config", None):
        _metrics = KVMetrics(collector)


def enabled() -> bool:
    return _metrics is not None


def requests_ended(figures: Iterable[RequestCompression]) -> None:
    if _metrics is None:
        return
    for c in figures:
        if c.decode_steps:
            _metrics.add("attended_tokens", c.policy, c.attended_tokens)
            _metrics.add("held_tokens", c.policy, c.held_tokens)
            _metrics.add("context_tokens", c.policy, c.context_tokens)


def evicted(policy: str, tokens: int) -> None:
    if _metrics is not None and tokens > 0:
        _metrics.add("evicted_tokens", policy, tokens)


def blocks_closed(policy: str, count: int) -> None:
    if _metrics is not None and count > 0:
        _metrics.add("blocks_closed", policy, count)


def selection_seconds(policy: str, seconds: Iterable[float]) -> None:
    if _metrics is not None:
        series = _metrics.selection.labels(**_metrics.labels, kv_policy=policy)
        for s in seconds:
            series.observe(s)


class SelectionClock:
    """Time each decode step spends selecting, without waiting for the device.

    On a CPU the ops run as they are called: wall time is theirs. On CUDA, a pair of events
    around each selection, summed per step once the step's last event has completed (read at a
    later step's end, by `query`, which does not wait)."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self._marks: list = []  # this step's (start, end) events, on CUDA
        self._seconds = 0.0  # this step's time, on the CPU
        self._steps: deque[list] = deque()  # earlier steps' events, not yet completed

    def start(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def stop(self, mark) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._marks.append((mark, event))
        else:
            self._seconds += time.perf_counter() - mark

    def end_step(self) -> list[float]:
        """The selection time of every step now known (seconds; steps that selected nothing
        are left out)."""
        if not self.cuda:
            seconds, self._seconds = self._seconds, 0.0
            return [seconds] if seconds else []
        if self._marks:
            self._steps.append(self._marks)
            self._marks = []
        done = []
        while self._steps and self._steps[0][-1][1].query():
            pairs = self._steps.popleft()
            done.append(sum(a.elapsed_time(b) for a, b in pairs) / 1000)
        return done
