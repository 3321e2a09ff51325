"""`python -m benchmarks.accuracy --quick` end to end on the tiny random model: prompts, one
shared engine (full, and dynsplit, snapkv and dynsplit's other split rules at 1/4 of the length,
chosen per request), generation, scoring, gzipped JSON, both tables and plots, and the resume file.
Checks the pipeline, not accuracy (the model is random)."""

import json
import os
import subprocess
import sys

import pytest
from transformers import AutoConfig

from benchmarks.accuracy.__main__ import QUICK, main
from benchmarks.accuracy.run import load_result

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.server
def test_quick_mode(tmp_path, tiny_model):
    out = tmp_path / "accuracy_quick.json"
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.accuracy", "--quick", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "| full | all |" in run.stdout and "| dynsplit | 128 (0.25) |" in run.stdout
    policy_table, rest = run.stdout.split("**split rules by scenario")[:2]
    split_table, paired_table = rest.split("**dynsplit against each policy, prompt by prompt")
    assert "| full | " in paired_table and "| snapkv | " in paired_table and "| dynsplit-fixed | " in paired_table
    assert "| snapkv |" in policy_table and "dynsplit-fixed" not in policy_table
    assert "| dynsplit-punct | 128 (0.25) |" in split_table and "snapkv" not in split_table

    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "accuracy_quick.json.gz",
        "accuracy_quick.png",
        "accuracy_quick_split_rule.png",
    ]
    result = load_result(str(tmp_path / "accuracy_quick.json.gz"))  # --out X.json names run X, written gzipped
    for key in ("commit", "device", "date", "command", "model", "settings", "accuracy", "samples"):
        assert key in result
    assert result["command"] == f"python -m benchmarks.accuracy --quick --out {out}"
    assert result["model"] == os.path.basename(tiny_model)
    records = result["samples"]
    labels = QUICK["kv"].split(",")
    assert len(records) == len(labels) * len(QUICK["tasks"]) * QUICK["samples"]
    assert {(r["policy"], r["budget"]) for r in records} == {(p, 512 if p == "full" else 128) for p in labels}
    for r in records:
        assert r["task"] in QUICK["tasks"] and isinstance(r["output"], str) and 0.0 <= r["score"] <= 1.0
        assert r["prompt_tokens"] <= 512 - 16 and r["answers"]
    everything = {r["policy"]: r for r in result["accuracy"] if r["group"] == "all"}
    assert set(everything) == set(labels)
    # dynsplit against every other policy on the same prompts
    assert {r["policy"]: r["prompts"] for r in result["paired"]} == {
        p: len(QUICK["tasks"]) for p in labels if p != "dynsplit"
    }
    # one prefill per prompt: every answer after the first found the prompt in the radix cache, all
    # but the last tokens its policy ranks with (the 32-token window of SnapKV and of DynSplit-KV's
    # resident set, recomputed on a hit) or, for full, the very last one (SGLang always computes it)
    for task in QUICK["tasks"]:
        rs = sorted((r for r in records if r["task"] == task), key=lambda r: r["cached_tokens"])
        assert rs[0]["cached_tokens"] < rs[0]["prompt_tokens"] // 2, rs[0]
        for r in rs[1:]:
            assert r["cached_tokens"] == r["prompt_tokens"] - (1 if r["policy"] == "full" else 32), r
    assert (tmp_path / "accuracy_quick.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "accuracy_quick_split_rule.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "accuracy_quick.partial.jsonl").exists(), "a finished run removes its resume file"

    (tmp_path / "accuracy_quick.png").unlink()
    main(["--replot", "--out", str(out)])
    assert (tmp_path / "accuracy_quick.png").read_bytes()[:4] == b"\x89PNG"

    # An interrupted run resumes from its .partial.jsonl: with every answer there, no engine starts.
    resumed = tmp_path / "resumed.json.gz"
    (tmp_path / "resumed.partial.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    again = main(["--quick", "--out", str(resumed)])
    assert again["samples"] == records and again["accuracy"] == result["accuracy"]


@pytest.mark.server
def test_blocks_around_the_answer(tmp_path, tiny_model, capsys):
    """`python -m benchmarks.accuracy.blocks` on the tiny model: the answer's place in the prompt,
    each split rule's output and the blocks near the answer (fixed-interval ones exactly C long)."""
    from benchmarks.accuracy import blocks

    shown = blocks.main(
        [
            "--task",
            "niah_single",
            "--length",
            "512",
            "--seed",
            "1",
            "--kv",
            "dynsplit,dynsplit-fixed",
            "--budget",
            "0.25",
            "--model",
            tiny_model,
            "--kept",
            "2",
        ]
    )
    text = capsys.readouterr().out
    kept = [line for line in text.splitlines() if "answer tokens kept by layer:" in line]
    assert len(kept) == 4  # two steps of each rule, one group of KV-head digits per layer
    layers = AutoConfig.from_pretrained(tiny_model).num_hidden_layers
    assert all(len(line.split(": ", 1)[1].split()) == layers for line in kept)
    assert "niah_single, 512 tokens, seed 1:" in text and "prompt tokens" in text
    assert set(shown) == {"dynsplit", "dynsplit-fixed"}
    fixed = shown["dynsplit-fixed"]["blocks"]
    assert fixed and all(end - start + 1 == 16 for start, end in fixed)
    for label, seen in shown.items():
        assert seen["blocks"] and f"\n{label}: output" in text
        assert all(start <= end for start, end in seen["blocks"])
    with pytest.raises(SystemExit):
        blocks.parse_args(["--kv", "snapkv"])
    with pytest.raises(SystemExit):
        blocks.parse_args(["--samples", "0"])
    with pytest.raises(SystemExit):
        blocks.parse_args(["--lead", "-1"])


@pytest.mark.server
def test_blocks_summary_over_samples(tiny_model, capsys):
    """`--samples N`: one engine answers the N prompts with each rule and a table sums them up; the
    per-request trace and selection probe are keyed by rid, so every prompt gets its own blocks,
    and each rule its own (the second rule's requests find the prompts in the radix cache)."""
    from benchmarks.accuracy import blocks

    seen = blocks.main(
        [
            "--task",
            "niah_single",
            "--length",
            "512",
            "--seed",
            "1",
            "--samples",
            "3",
            "--kv",
            "dynsplit,dynsplit-fixed",
            "--budget",
            "0.25",
            "--model",
            tiny_model,
            "--kept",
            "1",
            "--lead",
            "4",
        ]
    )
    text = capsys.readouterr().out
    assert "niah_single, 512 tokens, seeds 1..3, budget 128;" in text and "with the 4 tokens before it" in text
    assert "| policy | score | mean block | answer cut | answer kept | whole answer | whole answer by layer |" in text
    row = next(line for line in text.splitlines() if line.startswith("| dynsplit |"))
    score, mean_block, *rates, by_layer = row.strip("| ").split(" | ")[1:]
    assert all(0.0 <= float(v) <= 1.0 for v in (score, *rates)) and 12 <= float(mean_block) <= 20  # C ± Δ
    fixed_row = next(line for line in text.splitlines() if line.startswith("| dynsplit-fixed |"))
    assert fixed_row.split(" | ")[2] == "16.00"
    layers = AutoConfig.from_pretrained(tiny_model).num_hidden_layers
    assert len(by_layer) == layers and by_layer.isdigit()
    for _label, per_request in seen.items():
        assert sorted(per_request) == [f"blocks-niah_single-512-{seed}" for seed in (1, 2, 3)]
        for got in per_request.values():
            assert got["blocks"] and got["blocks"][0][0] == 0
            seq_len, per_layer = got["kept"][0]
            assert len(per_layer) == layers and seq_len > 128
    lengths = {
        label: {end - start + 1 for got in per_request.values() for start, end in got["blocks"]}
        for label, per_request in seen.items()
    }
    assert lengths["dynsplit-fixed"] == {16} and lengths["dynsplit"] != {16}


def test_answer_cut_and_summary_row():
    """The summary's columns on hand-made blocks and probe counts."""
    from benchmarks.accuracy import blocks
    from benchmarks.accuracy.tasks import Sample

    assert not blocks.answer_cut([[0, 9], [10, 19]], (12, 15))
    assert blocks.answer_cut([[0, 9], [10, 19]], (8, 11))
    sample = Sample("niah_single", "niah", "prose", 64, 0, (), ("42",), "all", 8, 16)
    prompts = [
        blocks.Prompt("a", sample, [0] * 20, (8, 11)),
        blocks.Prompt("b", sample, [0] * 20, (12, 15)),
        blocks.Prompt("c", sample, [0] * 20, None),
    ]
    seen = {
        "a": {"score": 1.0, "blocks": [[0, 9], [10, 19]], "kept": [(21, [[4, 0], [2, 4]])]},
        "b": {"score": 0.0, "blocks": [[0, 9], [10, 19]], "kept": [(21, [[4, 4], [0, 0]]), (22, [[0, 0], [0, 0]])]},
        "c": {"score": 0.5, "blocks": [], "kept": []},
    }
    row = blocks.summary_row("dynsplit", prompts, seen, steps=1)
    assert row["score"] == pytest.approx(0.5) and row["answer cut"] == pytest.approx(0.5)
    assert row["mean block"] == pytest.approx(10)  # c has no blocks yet: it counts for nothing
    # first decode steps only: a's heads keep 4/4, 0 (layer 0), 2/4, 4/4 (layer 1); b's 4/4, 4/4, 0, 0
    assert row["answer kept"] == pytest.approx((1 + 0 + 0.5 + 1 + 1 + 1 + 0 + 0) / 8)
    assert row["whole answer"] == pytest.approx(4 / 8)
    assert row["whole answer by layer"] == "72"  # layer 0: 3 of 4 heads, layer 1: 1 of 4
    two = blocks.summary_row("dynsplit", prompts, seen, steps=2)  # b's second step keeps nothing
    assert two["whole answer"] == pytest.approx(4 / 12) and two["whole answer by layer"] == "51"
    assert "answer kept" not in blocks.summary_row("dynsplit", prompts, seen, steps=0)


def test_split_rule_variants_show_in_the_policy_table_unless_the_whole_ablation_ran():
    from benchmarks.accuracy.__main__ import views
    from benchmarks.accuracy.policies import ABLATION

    alone = views(["full", "dynsplit", "quest", "dynsplit-fixed"], "family")
    assert alone == [("", ["full", "dynsplit", "quest", "dynsplit-fixed"], "family")]
    both = views([*ABLATION, "quest"], "family")
    assert both[0][1] == ["full", "dynsplit", "quest"] and both[1] == ("_split_rule", list(ABLATION), "scenario")
