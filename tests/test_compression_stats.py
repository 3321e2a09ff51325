"""What compression did per request (compression_stats.py) and the metrics it feeds (metrics.py),
without a server: the figures of a request from its forwards, dense layers and selections; a
request that leaves without a last output still counted; the metric series SGLang's collector
labels get. (tests/test_server.py and test_policies_server.py read them from real servers.)"""

import pytest
import torch

from dynsplit_sglang import metrics
from dynsplit_sglang.compression_stats import CompressionStats
from dynsplit_sglang.decode_step import DecodeStep

LAYERS = 4


class Recorded:
    """A stand-in for prometheus_client's Counter and Histogram: what each label set got."""

    def __init__(self, name, documentation, labelnames, buckets=None):
        self.name, self.labelnames, self.values = name, tuple(labelnames), {}

    def labels(self, **labels):
        assert tuple(labels) == self.labelnames
        key = labels["kv_policy"]
        owner = self

        class Series:
            def inc(self, amount=1.0):
                owner.values[key] = owner.values.get(key, 0.0) + amount

            def observe(self, amount):
                owner.values.setdefault(key, []).append(amount)

        return Series()


class Collector:
    """SGLang's scheduler collector as the metrics see it: its labels and metric classes."""

    labels = {"model_name": "m", "engine_type": "unified", "tp_rank": 0}
    _counter_cls = Recorded
    _histogram_cls = Recorded


class ServerArgs:
    _kv_config = {"policy": "dynsplit"}


@pytest.fixture
def recorded(monkeypatch):
    monkeypatch.setattr(metrics, "_metrics", None)
    metrics.install(Collector(), ServerArgs())
    return metrics._metrics


def step(lengths, rows, sparse_by_layer):
    return DecodeStep.build([torch.arange(n) for n in lengths], rows, sparse_by_layer, "cpu")


def test_a_requests_figures_from_its_forwards_dense_layers_and_selections(recorded):
    stats = CompressionStats(num_rows=8, num_layers=LAYERS, device="cpu")
    stats.begin(3, "a", "dynsplit", 16, True)
    stats.begin(5, "b", "quest", 32, False)
    stats.forward(3, 100, 0, is_decode=False)  # the prefill: no decode step
    stats.forward(5, 40, 0, is_decode=False)
    for k in range(2):
        stats.forward(3, 101 + k, 60, is_decode=True)  # eviction gave 60 prompt tokens back
        stats.forward(5, 41 + k, 0, is_decode=True)
        # a longer than its budget selects in layers 1..3; b, within its own, is dense everywhere
        s = step([41 + k, 41 + k], [3, 5], [[], [0], [0], [0]])
        assert s.dense_layers == (1, LAYERS)
        stats.dense(s)
        for _ in range(3):  # 2 KV heads: 16 and 12 slots valid
            valid = torch.zeros(1, 2, 16, dtype=torch.bool)
            valid[0, 0], valid[0, 1, :12] = True, True
            stats.selected(s.rows[torch.tensor([0])], valid)
    figures = stats.end(["a", "b"])
    a, b = figures["a"].meta_info(), figures["b"].meta_info()
    # a: per step one dense layer over its 41 / 42 view and three of 14 (mean over heads)
    assert a == {
        "policy": "dynsplit",
        "budget": 16,
        "evict": True,
        "decode_steps": 2,
        "mean_attended_tokens": round(((41 + 42) + 2 * 3 * 14) / 2 / LAYERS, 2),
        "mean_held_tokens": 41.5,
        "resident_tokens": 42,
        "evicted_tokens": 60,
    }
    assert b["mean_attended_tokens"] == b["mean_held_tokens"] == 41.5 and b["evicted_tokens"] == 0
    assert len(stats) == 0 and stats.end(["a"]) == {}
    # the metrics got both requests, by policy
    assert recorded.counters["attended_tokens"].values == pytest.approx({"dynsplit": (83 + 84) / LAYERS, "quest": 83.0})
    assert recorded.counters["held_tokens"].values == {"dynsplit": 83, "quest": 83}
    assert recorded.counters["context_tokens"].values == {"dynsplit": 203, "quest": 83}


def test_a_request_that_leaves_without_an_output_is_counted_once(recorded):
    stats = CompressionStats(num_rows=4, num_layers=LAYERS, device="cpu")
    stats.begin(1, "gone", "dynsplit", 16, False)
    stats.forward(1, 50, 0, is_decode=True)
    stats.dense(step([50], [1], [[]] * LAYERS))
    stats.drop({0, 1, 2})  # a prefill found its row free (retracted or aborted)
    assert len(stats) == 0 and recorded.counters["held_tokens"].values == {"dynsplit": 50}
    # retracted and prefilled again into another row: counted afresh, the row's sum zeroed
    stats.begin(1, "next", "dynsplit", 16, False)
    stats.forward(1, 10, 0, is_decode=True)
    stats.dense(step([10], [1], [[]] * LAYERS))
    stats.begin(1, "after", "dynsplit", 16, False)  # a new request took the row: "next" is counted
    assert recorded.counters["held_tokens"].values == {"dynsplit": 60}
    assert recorded.counters["attended_tokens"].values == {"dynsplit": 60.0}
    assert stats.end(["after"])["after"].meta_info()["mean_attended_tokens"] is None


def test_no_metrics_without_a_compressing_policy(monkeypatch):
    monkeypatch.setattr(metrics, "_metrics", None)

    class Full:
        _kv_config = None

    metrics.install(Collector(), Full())
    assert not metrics.enabled()
    metrics.evicted("dynsplit", 10)  # a no-op, not an error


def test_evicted_tokens_blocks_and_selection_time_series(recorded):
    metrics.evicted("snapkv", 120)
    metrics.blocks_closed("dynsplit", 3)
    metrics.blocks_closed("dynsplit", 0)
    clock = metrics.SelectionClock("cpu")
    assert clock.end_step() == []  # a step that selected nothing
    mark = clock.start()
    clock.stop(mark)
    seconds = clock.end_step()
    metrics.selection_seconds("dynsplit", seconds)
    assert recorded.counters["evicted_tokens"].values == {"snapkv": 120} and recorded.counters[
        "blocks_closed"
    ].values == {"dynsplit": 3}
    assert len(recorded.selection.values["dynsplit"]) == 1 and seconds[0] > 0
    assert list(metrics.SELECTION_BUCKETS) == sorted(metrics.SELECTION_BUCKETS)
