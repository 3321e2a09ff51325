"""The independent SnapKV of benchmarks/accuracy/snapkv_reference.py: its ranking, its decode mask
and its attention plumbing on the tiny model (no SGLang engine)."""

import json

import pytest
import torch

from benchmarks.accuracy import snapkv_reference as ref
from benchmarks.accuracy.run import write_result
from dynsplit_sglang.policies import SnapKVOptions


def test_snap_order_window_first_then_votes():
    n, heads, kv_heads = 10, 4, 2
    weights = torch.zeros(heads, n, n)
    weights[:2, -3:, 2] = 1.0  # KV head 0's query heads look at position 2
    weights[2:, -3:, 5] = 1.0  # KV head 1's at position 5
    order = ref.snap_order(weights, kv_heads, SnapKVOptions(window=3, kernel_size=1))
    assert order.shape == (2, 10)
    assert order[:, :3].tolist() == [[9, 8, 7], [9, 8, 7]]  # the window, newest first
    assert order[0, 3].item() == 2 and order[1, 3].item() == 5
    assert sorted(order[0].tolist()) == list(range(10))


def test_snap_order_pools_neighbours():
    n = 12
    weights = torch.zeros(1, n, n)
    weights[0, -2:, 4] = 1.0
    weights[0, -2:, 6] = 1.0  # position 5 gets both neighbours' votes through the pooling
    order = ref.snap_order(weights, 1, SnapKVOptions(window=2, kernel_size=3))
    assert order[0, 2].item() == 5


def test_decode_mask_budget():
    order = torch.tensor([[5, 4, 3, 2, 1, 0], [5, 4, 0, 1, 2, 3]])
    # 6 prompt tokens and 1 generated (7 keys), budget 4: the generated token + 3 best prompt positions
    m = ref.decode_mask(order, budget=4, prompt_len=6, total=7, forced=[])
    assert m[0].nonzero().flatten().tolist() == [3, 4, 5, 6]
    assert m[1].nonzero().flatten().tolist() == [0, 4, 5, 6]
    # generated tokens push out prompt positions; forced positions come on top of the budget
    m = ref.decode_mask(order, budget=4, prompt_len=6, total=9, forced=[1])
    assert m[0].nonzero().flatten().tolist() == [1, 5, 6, 7, 8]
    assert ref.decode_mask(order, budget=8, prompt_len=6, total=7, forced=[]).all()  # fits: everything


def test_suite_answers_reads_partial_and_final(tmp_path):
    rec = {
        "policy": "snapkv",
        "task": "niah_single",
        "length": 2048,
        "seed": 3,
        "budget_setting": 0.25,
        "output": " 12.",
    }
    other = dict(rec, policy="quest", output=" 13.")
    partial = tmp_path / "accuracy.partial.jsonl"
    partial.write_text(json.dumps(rec) + "\n" + json.dumps(other) + "\n" + '{"policy": "snap')  # a cut-off last line
    assert ref.suite_answers(str(partial)) == {("niah_single", 2048, 3, 0.25): " 12."}
    final = tmp_path / "accuracy.json"  # a result saved before results were gzipped
    final.write_text(json.dumps({"samples": [rec, other]}))
    assert ref.suite_answers(str(final)) == {("niah_single", 2048, 3, 0.25): " 12."}
    assert ref.suite_answers(str(tmp_path / "accuracy.json.gz")) == {("niah_single", 2048, 3, 0.25): " 12."}
    write_result({"samples": [dict(rec, output=" 14."), other]}, str(final))  # the gzipped one wins
    assert ref.suite_answers(str(final)) == {("niah_single", 2048, 3, 0.25): " 14."}
    assert ref.suite_answers(str(tmp_path / "missing.json")) == {}


@pytest.fixture(scope="module")
def reference(tiny_model):
    return ref.reference_model(tiny_model)


def test_mask_plumbing_on_the_tiny_model(reference):
    tokenizer, model, holder = reference
    ids = tokenizer(
        "one two three four five six seven eight nine ten eleven twelve " * 4,
        add_special_tokens=False,
        return_tensors="pt",
    ).input_ids
    n = ids.shape[1]
    full = ref.generate(tokenizer, model, holder, ids, 12, None)
    # a selection that keeps every prompt position through the decode mask: the same tokens
    everything = ref.Selection(budget=4, prompt_len=n, forced=list(range(n)))
    assert ref.generate(tokenizer, model, holder, ids, 12, everything) == full
    assert (
        ref.generate(tokenizer, model, holder, ids, 12, ref.Selection(budget=4, prompt_len=n, dense_layers=99)) == full
    )
    # a real selection ranked every layer and masks decode steps: the logits of the first step differ
    sel = ref.Selection(budget=6, prompt_len=n)
    holder[0] = sel
    try:
        with torch.no_grad():
            out = model(ids, use_cache=True)
            step = model(out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values)
    finally:
        holder[0] = None
    assert sorted(sel.orders) == list(range(model.config.num_hidden_layers))
    assert all(o.shape == (model.config.num_key_value_heads, n) for o in sel.orders.values())
    with torch.no_grad():
        dense = model(ids, use_cache=True)
        dense_step = model(dense.logits[:, -1:].argmax(-1), past_key_values=dense.past_key_values)
    assert torch.equal(out.logits, dense.logits)  # the prefill itself is untouched
    assert not torch.allclose(step.logits, dense_step.logits)
    assert holder[0] is None


def test_cli_rejects_bad_input(capsys):
    for argv, message in (
        (["--samples", "0"], "--samples 0"),
        (["--budget", "0"], "--budget 0.0"),
        (["--keep-answer", "-1"], "--keep-answer -1"),
    ):
        with pytest.raises(SystemExit):
            ref.parse_args(argv)
        assert message in capsys.readouterr().err


def test_cli_on_the_tiny_model(tiny_model, tmp_path, capsys):
    rows = ref.main(
        [
            "--model",
            tiny_model,
            "--task",
            "niah_single",
            "--length",
            "512",
            "--budget",
            "0.25",
            "--keep-answer",
            "4",
            "--results",
            str(tmp_path / "none.json"),
        ]
    )
    assert len(rows) == 1 and rows[0]["suite"] is None and rows[0]["reference_score"] in (0.0, 1.0)
    assert "| 0 |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="not less than"):
        ref.main(
            ["--model", tiny_model, "--length", "512", "--budget", "4096", "--results", str(tmp_path / "none.json")]
        )
