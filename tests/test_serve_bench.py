"""The server benchmark: its measuring rules on made-up streams, and the whole run on the CPU."""

import json

import pytest

from benchmarks import serve_bench
from benchmarks.serve_bench import Setting, Stream, decode_window, max_batch, parse_settings


def test_settings_parse_and_bad_ones_are_named():
    assert parse_settings("32768x8, 131072xmax") == [Setting(32768, 8), Setting(131072, None)]
    for bad in ("32768", "32kx8", "32768x0", "0x4", "8xmany"):
        with pytest.raises(SystemExit, match="--settings"):
            parse_settings(bad)


def test_decode_window_counts_only_while_all_requests_decode():
    # a: first token at t=10, then one token per time unit; b: prefilled later, first token at 20.
    a = Stream(times=[10.0 + i for i in range(40)], tokens=list(range(1, 41)))  # last at 49
    b = Stream(times=[20.0 + i for i in range(40)], tokens=list(range(1, 41)))  # last at 59
    seconds, tokens = decode_window([a, b])
    assert seconds == 49 - 20
    # a: 11 tokens by t=20, 40 by t=49; b: 1 -> 30; 29 each
    assert tokens == 29 + 29
    # tokens that arrive coalesced in one chunk count at the chunk's time
    assert Stream(times=[1.0, 2.0], tokens=[1, 9]).tokens_at(1.5) == 1
    # a request that finished before another one's first token: no common window
    assert decode_window([Stream(times=[0.0, 1.0], tokens=[1, 2]), Stream(times=[2.0, 3.0], tokens=[1, 2])]) == (0.0, 0)


def test_step_breakdown_splits_each_decode_step():
    """Labelled parts count inside the decode steps of the batch asked for; gather is taken out of
    attention; the rest is what no label covers."""
    ev = [
        {"name": "step[DECODE bs=2]", "ts": 0, "dur": 10_000},
        {"name": "step[DECODE bs=2]", "ts": 20_000, "dur": 14_000},
        {"name": "step[DECODE bs=1]", "ts": 40_000, "dur": 5_000},  # another batch size: not counted
        {"name": "dynsplit:select", "ts": 1_000, "dur": 2_000},
        {"name": "dynsplit:attention", "ts": 4_000, "dur": 4_000},
        {"name": "dynsplit:gather", "ts": 4_000, "dur": 1_000},
        {"name": "dynsplit:select", "ts": 21_000, "dur": 2_000},
        {"name": "dynsplit:select", "ts": 41_000, "dur": 3_000},
    ]
    got = serve_bench.step_breakdown(ev, 2)
    assert got["steps"] == 2 and got["step_ms"] == 12.0
    assert got["selection"] == 2.0 and got["gather"] == 0.5 and got["attention"] == 1.5
    assert got["rest"] == 12.0 - 2.0 - 0.5 - 1.5
    with pytest.raises(RuntimeError, match="no step"):
        serve_bench.step_breakdown(ev, 4)


def test_max_batch_leaves_room_for_the_admission_reserve():
    assert max_batch(430_000, 131_072) == 3
    assert max_batch(4096, 1024) == 3  # 4 would fill the pool exactly and not be admitted at once
    assert max_batch(1000, 4096) == 1


@pytest.mark.server
def test_smoke_run_end_to_end(tmp_path, capsys):
    """Two CPU servers (full, dynsplit) on the tiny random model; checks the pipeline, not speed."""
    out = tmp_path / "serve.json"
    result = serve_bench.main(["--smoke", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["rows"] == result["rows"]
    for key in ("commit", "device", "date", "command"):
        assert saved[key]
    rows = {(r["policy"], r["context"]): r for r in saved["rows"]}
    assert set(rows) == {(p, c) for p in ("full", "dynsplit") for c in (512, 1024)}
    for r in rows.values():
        assert r["batch"] == (2 if r["context"] == 512 else 3)  # 'max' from full's 4096-token pool
        assert r["kv_pool_tokens"] == 4096 and r["weight_gb"] is not None
        assert r["peak_memory_gib"] > 0 and 0 < r["first_token_s"] <= r["wall_s"]
    assert rows[("dynsplit", 512)]["budget"] == 128 and rows[("full", 512)]["budget"] is None
    table = capsys.readouterr().out
    assert "| dynsplit (128) | 512 | 2 |" in table and "| full | 1024 | 3 |" in table
    # the profile pass: SGLang's profiler traced decode steps of both servers
    profiles = {p["policy"]: p for p in saved["profile"]}
    assert set(profiles) == {"dynsplit"}  # full runs SGLang's own backend, which labels nothing
    assert profiles["dynsplit"]["selection"] > 0 and profiles["dynsplit"]["attention"] > 0
    assert 0 < profiles["dynsplit"]["rest"] < profiles["dynsplit"]["step_ms"]
    assert "Where a decode step's time goes" in table
    assert (tmp_path / "serve.png").stat().st_size > 0


def test_server_flags_per_kv_entry():
    assert serve_bench.server_args("full", 4096, 8192)[-2:] == ["--kv", "full"]
    flags = serve_bench.server_args("dynsplit:dynsplit_flashinfer", 2048, 8192)
    assert flags[-6:] == ["--kv", "dynsplit", "--kv-budget", "2048", "--attention-backend", "dynsplit_flashinfer"]
    flags = serve_bench.server_args("dynsplit:dynsplit_flashinfer:breakable", 2048, 8192)
    assert flags[-4:] == ["--attention-backend", "dynsplit_flashinfer", "--cuda-graph-backend-decode", "breakable"]
    flags = serve_bench.server_args("dynsplit::breakable", 2048, 8192)
    assert "--attention-backend" not in flags and flags[-2:] == ["--cuda-graph-backend-decode", "breakable"]
    flags = serve_bench.server_args("dense", 2048, 32768)  # our backend, every request dense
    assert flags[-4:] == ["--kv", "dynsplit", "--kv-budget", "32768"]
    # rows label dense and full without --kv-budget: both attend to every token
    assert serve_bench.row_budget("dense", 2048) is None and serve_bench.row_budget("full", 2048) is None
    assert serve_bench.row_budget("dynsplit:dynsplit_flashinfer", 2048) == 2048


def test_kv_entries_with_options_and_labels():
    entries = serve_bench.parse_entries('full,C8=dynsplit{"block_size": 8, "delta": 2},dense,quest{"page_size":8}:x')
    assert [e.label for e in entries] == ["full", "C8", "dense", 'quest{"page_size":8}:x']
    c8 = entries[1]
    assert (c8.policy, c8.options, c8.on_cpu) == ("dynsplit", {"block_size": 8, "delta": 2}, True)
    assert serve_bench.server_args(c8, 1024, 8192)[-4:] == [
        "--kv-budget",
        "1024",
        "--kv-config",
        '{"block_size":8,"delta":2}',
    ]
    assert (entries[3].backend, entries[3].on_cpu) == ("x", False)  # a backend: not a CPU entry
    for bad, why in (
        ('full{"a": 1}', "full takes no options"),
        ("C8=dynsplit{1}", "options"),
        ("dynsplit,dynsplit", "same label"),
        ("=dynsplit", "empty label"),
        ("x={}", "names no policy"),
    ):
        with pytest.raises(SystemExit, match=why):
            serve_bench.parse_entries(bad)
