"""`python -m benchmarks.accuracy.sweep`: the grid, the ranking, the validation's policies, and a
quick sweep end to end on the tiny random model."""

import subprocess
import sys

import pytest

from benchmarks.accuracy import sweep
from benchmarks.accuracy.__main__ import parse_seeds
from benchmarks.accuracy.run import load_result


def test_grid_is_every_combination_and_joined_options_vary_together():
    grid = sweep.parse_grid("block_size=8,16 sink_tokens+recent_tokens=4+32,2+8")
    assert grid == [
        {"block_size": 8, "sink_tokens": 4, "recent_tokens": 32},
        {"block_size": 8, "sink_tokens": 2, "recent_tokens": 8},
        {"block_size": 16, "sink_tokens": 4, "recent_tokens": 32},
        {"block_size": 16, "sink_tokens": 2, "recent_tokens": 8},
    ]
    for bad in ("block_size", "block_size=", "sink_tokens+recent_tokens=4"):
        with pytest.raises(SystemExit, match="--grid"):
            sweep.parse_grid(bad)


def test_configurations_leave_out_the_defaults_repeats_and_what_the_policy_refuses(capsys):
    configs = sweep.configurations(["block_size=4,8,16 delta=2,4", "block_size=8 delta=2"], layers=30)
    # C=16 Δ=4 is the defaults (the reference row), C=4 Δ=4 is refused (Δ must be < C), C8-d2 comes once
    assert [name for name, _ in configs] == ["C4-d2", "C8-d2", "C8", "d2"]
    assert dict(configs)["C8"] == {"block_size": 8}
    assert "left out" in capsys.readouterr().err
    layers = dict(sweep.configurations(["score_layers=middle,all,last_half"], layers=6))
    assert layers == {
        "layers-all": {"score_layers": [0, 1, 2, 3, 4, 5]},
        "layers-last_half": {"score_layers": [3, 4, 5]},
    }
    with pytest.raises(SystemExit, match="not a dynsplit option"):
        sweep.configurations(["page_size=8"], layers=30)


def test_seeds_are_a_range_or_a_list():
    assert parse_seeds("1000-1003") == [1000, 1001, 1002, 1003]
    assert parse_seeds("5,7") == [5, 7]
    for bad in ("a-b", "3-1", "1,1", "-2"):
        with pytest.raises(SystemExit, match="--seeds"):
            parse_seeds(bad)


def _record(policy, config, task, seed, setting, score):
    return {
        "policy": policy,
        "kv": "full" if policy == "full" else "dynsplit",
        "config": config,
        "task": task,
        "family": task,
        "scenario": "prose",
        "length": 1024,
        "seed": seed,
        "budget_setting": setting,
        "budget": 1024 if setting is None else int(setting * 1024),
        "fraction": 1.0 if setting is None else setting,
        "prompt_tokens": 1000,
        "score": score,
    }


def test_ranking_orders_by_mean_accuracy_and_counts_prompts_won_against_the_defaults():
    from benchmarks.accuracy.report import aggregate

    small = {"block_size": 8}
    records = []
    for seed in range(6):
        for setting in (0.25, 0.125):
            records.append(_record("dynsplit", {}, "a", seed, setting, 1.0 if seed < 2 else 0.0))
            records.append(_record("C8", small, "a", seed, setting, 1.0 if seed < 5 else 0.0))
        records.append(_record("full", {}, "a", seed, None, 1.0))
    result = {
        "settings": {
            "policies": [
                {"label": "full", "kv": "full", "config": {}},
                {"label": "dynsplit", "kv": "dynsplit", "config": {}},
                {"label": "C8", "kv": "dynsplit", "config": small},
            ]
        },
        "accuracy": aggregate(records),
        "samples": records,
    }
    rows = sweep.rank(result)
    assert [r["label"] for r in rows] == ["C8", "dynsplit"]  # full is the reference line, not a configuration
    best, defaults = rows
    assert best["accuracy"] == {"0.25": 0.8333, "0.125": 0.8333} and defaults["mean"] == 0.3333
    assert (best["wins"], best["losses"]) == (6, 0)  # 3 prompts x 2 budgets
    assert best["p"] == pytest.approx(2 / 2**6, rel=1e-2) and best["vs_defaults"] == 0.5
    assert best["always_kept"] < defaults["always_kept"]  # smaller blocks: a shorter open tail
    table = sweep.ranking_markdown(rows)
    assert '| 1 | C8 | `{"block_size":8}` |' in table and "(defaults)" in table


def test_speed_runs_serve_bench_with_full_and_the_defaults_and_joins_the_ranking(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(
        sweep.subprocess, "run", lambda argv, check: calls.append(argv) or sweep.subprocess.CompletedProcess(argv, 0)
    )
    sweep.run_speed([("C8", {"block_size": 8})], str(tmp_path / "s.json.gz"), None)
    argv = calls[0]
    assert argv[1:3] == ["-m", "benchmarks.serve_bench"] and "7048x4" in argv
    assert argv[argv.index("--kv") + 1] == 'full,dynsplit,C8=dynsplit{"block_size":8}'
    assert argv[argv.index("--out") + 1] == str(tmp_path / "s_speed.json")
    rows = [{"label": "dynsplit", "accuracy": {"0.25": 0.5}}, {"label": "C8", "accuracy": {"0.25": 0.6}}]
    speed = {"rows": [{"policy": "dynsplit", "decode_step_ms": 100.0}, {"policy": "C8", "decode_step_ms": 125.0}]}
    sweep.add_speed(rows, speed)
    assert rows[1]["speed_vs_defaults"] == 0.8 and rows[0]["speed_vs_defaults"] == 1.0


def test_validation_compares_each_candidate_with_equally_fine_fixed_splits_and_quest():
    kv = sweep.validation_kv([("C8-d2", {"block_size": 8, "delta": 2}), ("d2", {"delta": 2})])
    entries = kv.split(",")
    assert entries[:4] == ["full", "dynsplit", "dynsplit-fixed", "quest"]  # the shipped defaults' rows
    assert 'quest-8=quest{"page_size":8}' in kv
    assert 'dynsplit-fixed-C8=dynsplit{"split":"fixed_interval","block_size":8}' in kv
    assert "quest-16" not in kv  # C=16 is the defaults' own size: quest and dynsplit-fixed already


def test_validate_runs_the_suite_on_its_own_seeds_with_the_saved_configurations(monkeypatch, tmp_path):
    from benchmarks.accuracy import __main__ as suite
    from benchmarks.accuracy.run import write_result

    policies = [
        {"label": "dynsplit", "kv": "dynsplit", "config": {}},
        {"label": "C8", "kv": "dynsplit", "config": {"block_size": 8}},
    ]
    write_result({"settings": {"policies": policies}}, str(tmp_path / "s.json.gz"))
    calls = []
    monkeypatch.setattr(suite, "main", lambda argv: calls.append(argv))
    sweep.main(["--validate", "C8", "--out", str(tmp_path / "s.json.gz")])
    argv = calls[0]
    value = dict(zip(argv[::2], argv[1::2]))
    assert value["--kv"] == sweep.validation_kv([("C8", {"block_size": 8})])
    assert (value["--lengths"], value["--samples"], value["--paired-with"]) == ("2048,4096,8192", "30", "C8")
    assert value["--tasks"] == sweep.DEFAULT_TASKS and "--seeds" not in value  # the suite's own seeds 0-29
    assert value["--out"] == str(tmp_path / "s_validation.json.gz")
    with pytest.raises(SystemExit, match="dynsplit is the shipped defaults"):  # not a duplicate-label error
        sweep.main(["--validate", "dynsplit,C8", "--out", str(tmp_path / "s.json.gz")])
    assert len(calls) == 1


def _sweep(*args: str) -> subprocess.CompletedProcess:
    """`python -m benchmarks.accuracy.sweep ARGS` in a child process (the engine spawns workers)."""
    cmd = [sys.executable, "-m", "benchmarks.accuracy.sweep", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900)


@pytest.mark.server
def test_quick_sweep_end_to_end(tmp_path, tiny_model):
    out = tmp_path / "sweep.json.gz"
    proc = _sweep("--quick", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = load_result(str(out))
    labels = [p["label"] for p in result["settings"]["policies"]]
    assert labels == ["full", "dynsplit", "C8-d2", "C8", "d2"]  # one engine: different block sizes side by side
    assert [r["label"] for r in result["ranking"]] and {r["label"] for r in result["ranking"]} == set(labels[1:])
    assert result["sweep_command"] == f"python -m benchmarks.accuracy.sweep --quick --out {out}"
    assert len(result["samples"]) == 2 * (1 + 4)  # 2 prompts x (full + 4 configurations at one budget)
    assert (tmp_path / "sweep_ranking.png").read_bytes()[:4] == b"\x89PNG"
    assert "| rank | label |" in proc.stdout
    ranked = _sweep("--rank", "--out", str(out))
    assert ranked.returncode == 0 and "| rank | label |" in ranked.stdout
    missing = _sweep("--validate", "C99", "--out", str(out))
    assert missing.returncode != 0 and "C99 not in the sweep" in missing.stderr
