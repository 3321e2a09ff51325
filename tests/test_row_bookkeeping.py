"""The backend's per-row bookkeeping (PolicyHost._begin_forward) on fake SGLang batches: a request
cancelled between its prefill and its first decode step, and a row a new request takes in the
same scheduler step as its last one left it, leave no per-request state behind."""

from types import SimpleNamespace

import pytest
import torch

from dynsplit_sglang import eviction, request_options
from dynsplit_sglang.compression_stats import CompressionStats
from dynsplit_sglang.config import KVConfig
from dynsplit_sglang.policies import POLICY_CLASSES, SnapKVOptions
from dynsplit_sglang.policy_host import PolicyHost
from tests.test_policies import SHAPE, FakeTokens

BUDGET = 32
ROWS, ROW_LEN = 8, 512  # req_to_token rows, each over its own slots


class Mode:
    def __init__(self, decode: bool):
        self.decode, self.name = decode, "DECODE" if decode else "EXTEND"

    def is_idle(self):
        return False

    def is_decode(self):
        return self.decode

    def is_extend_without_speculative(self):
        return not self.decode

    def is_mixed(self):
        return False


class FakeReq:
    """What request_options reads of SGLang's Req (held by weak reference)."""

    def __init__(self, rid: str, prompt: int):
        self.rid, self.origin_input_ids = rid, [0] * prompt
        self.sampling_params = SimpleNamespace(custom_params=None)


class Host(PolicyHost):
    """A PolicyHost with SGLang's side faked: a req_to_token pool (rows, their allocation counts,
    the free rows) and a SnapKV policy that records the rows it is told to forget."""

    def __init__(self):
        kv = KVConfig("snapkv", BUDGET, SnapKVOptions())
        self.kv, self.shape, self.device = kv, SHAPE, "cpu"
        self.policy = POLICY_CLASSES["snapkv"](kv, SHAPE, ROWS * ROW_LEN, torch.float32, "cpu", FakeTokens())
        self.released: list[set[int]] = []
        forget = self.policy.release_rows
        self.policy.release_rows = lambda rows: (self.released.append(set(rows)), forget(rows))
        self._plan = eviction.EvictionPlan({"snapkv": lambda b, n: b}, {"snapkv": True}, "snapkv", BUDGET, 1)
        self._row_request, self._lock = {}, None
        self._compression, self._clock = CompressionStats(ROWS, SHAPE.num_layers, "cpu"), None
        self.req_to_token_pool = SimpleNamespace(
            req_to_token=torch.arange(ROWS * ROW_LEN).reshape(ROWS, ROW_LEN),
            req_generation=torch.zeros(ROWS, dtype=torch.int64),
            free_slots=list(range(ROWS)),
        )
        self.live = {}  # rid -> the fake SGLang request (request_options holds it weakly)

    def admit(self, rid: str, row: int, prompt: int) -> None:
        """SGLang gives a new request a row (its allocation count goes up)."""
        self.req_to_token_pool.free_slots.remove(row)
        self.req_to_token_pool.req_generation[row] += 1
        self.live[rid] = FakeReq(rid, prompt)
        request_options.record(self.live[rid])

    def leave(self, rid: str, row: int) -> None:
        """The request finished or was aborted: SGLang frees its row."""
        self.req_to_token_pool.free_slots.append(row)
        del self.live[rid]

    def prefill(self, *reqs: tuple[str, int, int]) -> None:
        """A prefill forward of (rid, row, prompt tokens), nothing from the radix cache."""
        n = [p for _, _, p in reqs]
        self._begin_forward(
            SimpleNamespace(
                forward_mode=Mode(False),
                seq_lens=torch.tensor(n),
                req_pool_indices=torch.tensor([row for _, row, _ in reqs]),
                extend_prefix_lens=torch.zeros(len(reqs), dtype=torch.int64),
                input_ids=torch.zeros(sum(n), dtype=torch.int64),
                rids=[rid for rid, _, _ in reqs],
            )
        )

    def state(self) -> dict:
        """Per-request state the host and its plan hold: row -> rid."""
        return {row: r.rid for row, r in self._row_request.items()}


@pytest.fixture
def host():
    request_options.enable(KVConfig("snapkv", BUDGET, SnapKVOptions()))
    request_options.configure(KVConfig("snapkv", BUDGET, SnapKVOptions()), 8192)
    yield Host()
    request_options.configure(None, None)
    request_options.enable(KVConfig("full", 1, None))


def test_a_request_cancelled_before_its_first_decode_leaves_nothing(host):
    host.admit("a", 3, 300)
    host.prefill(("a", 3, 300))
    assert host.state() == {3: "a"} and host._plan.stats()["evicting"] == 1  # its prompt compacts
    host.leave("a", 3)  # aborted before any decode step
    host.admit("b", 5, 200)
    host.prefill(("b", 5, 200))  # the next prefill drops what row 3's request left
    assert host.state() == {5: "b"} and host._plan.stats()["evicting"] == 1
    assert 3 in host.released[-1]
    assert host._plan.of(3, 1, "a") is None
    assert len(host._compression) == 1  # a's figures went to the metrics with its row


def test_a_row_taken_in_the_step_its_request_left_starts_clean(host):
    host.admit("a", 3, 300)
    host.prefill(("a", 3, 300))
    # a finishes and c gets row 3 in the same scheduler step: the row is never seen free
    host.leave("a", 3)
    host.admit("c", 3, 100)
    assert 3 not in host.req_to_token_pool.free_slots
    host.prefill(("c", 3, 100))
    assert host.state() == {3: "c"}
    assert 3 in host.released[-1], "a's policy state in row 3 must go before c uses the row"
    # c's own eviction (32 of its 100 prompt tokens kept), under the row's new generation
    assert host._plan.of(3, 1, "a") is None and host._plan.of(3, 2, "c") is not None
    assert host._plan.stats()["evicting"] == 1
    host.leave("c", 3)
    host.admit("d", 0, 30)
    host.prefill(("d", 0, 30))
    assert host.state() == {0: "d"} and host._plan.stats()["evicting"] == 0  # d is within its budget
    assert len(host._compression) == 1
