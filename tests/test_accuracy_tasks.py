"""The accuracy suite's task generators, scorer, policy list and report, without an engine."""

import gzip
import json
import random

import pytest

from benchmarks.accuracy import data, scoring
from benchmarks.accuracy.__main__ import main as progress_main
from benchmarks.accuracy.policies import VARIANTS, engine_args, parse_policies, policy_engine_kwargs
from benchmarks.accuracy.report import (
    aggregate,
    budget_name,
    markdown,
    paired,
    paired_markdown,
    plot,
    sign_test,
    summary_markdown,
)
from benchmarks.accuracy.run import (
    Settings,
    budget_tokens,
    engine_groups,
    find_result,
    load_partial,
    load_result,
    pending,
    request_params,
    result_path,
    run_base,
    saved_records,
    write_result,
)
from benchmarks.accuracy.tasks import TASKS, Sample, largest_fitting, make_sample, render


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)  # SmolLM2's tokenizer and chat template


def fake(metric, answers):
    return Sample("t", "f", "s", 1024, 0, ({"role": "user", "content": ""},), tuple(answers), metric, 8, 10)


def test_scoring_known_answers():
    assert scoring.string_match_all(
        "The numbers are 1234567 and 7654321.", ["1234567", "7654321", "1111111"]
    ) == pytest.approx(2 / 3)
    assert scoring.string_match_all("vars: ABCDE, fghij", ["abcde", "FGHIJ"]) == 1.0  # case-insensitive
    assert scoring.string_match_all("nothing here", ["x1"]) == 0.0
    assert scoring.string_match_part("It was in France.", ["France", "in France"]) == 1.0
    assert scoring.string_match_part("Germany", ["France", "in France"]) == 0.0
    assert scoring.score(fake("all", ["42", "43"]), " 42 and then 44") == 0.5
    assert scoring.score(fake("part", ["Paris", "the city of Paris"]), "paris") == 1.0
    scoring.check(fake("all", ["red-fox", "blue-owl", "1234567"]))


def test_sentence_splitter():
    text = 'Hello there.  He said "go." Then e.g. this one!\n3 cats? (Yes.) Done'
    assert data.split_sentences(text) == [
        "Hello there.",
        'He said "go."',
        "Then e.g. this one!",
        "3 cats?",
        "(Yes.)",
        "Done",
    ]
    assert data.split_sentences("") == []
    assert len(data.essay_sentences()) > 5000


def test_largest_fitting_finds_the_boundary():
    for per_unit, base, target in [(7, 100, 2048), (1, 0, 5), (30, 50, 81), (13, 400, 100_000)]:
        n = largest_fitting(lambda n, base=base, per_unit=per_unit: base + per_unit * n, target, 10**6)
        assert base + per_unit * n <= target < base + per_unit * (n + 1)
    assert largest_fitting(lambda n: min(n, 50), 100, 10**4) == 10**4  # never reaches the target
    with pytest.raises(ValueError):
        largest_fitting(lambda n: 100 + n, 50, 100)


@pytest.mark.parametrize("task", list(TASKS))
def test_task_prompt(tokenizer, task):
    length = 2048
    sample = make_sample(tokenizer, task, length, seed=3)
    t = TASKS[task]
    assert (sample.task, sample.family, sample.scenario, sample.metric) == (task, t.family, t.scenario, t.metric)
    target = length - sample.max_new_tokens
    assert 0.95 * target <= sample.num_tokens <= target, (
        "the prompt fills the length setting, leaving room for the answer"
    )
    assert sample.num_tokens == len(tokenizer(render(tokenizer, sample.messages), add_special_tokens=False).input_ids)
    user = sample.messages[0]["content"]
    assert sample.answers and all(a in user for a in sample.answers), "every gold answer is in the context"
    scoring.check(sample)
    assert make_sample(tokenizer, task, length, seed=3) == sample, "same seed, same prompt"
    assert make_sample(tokenizer, task, length, seed=4).messages != sample.messages


def test_longer_prompts_and_needle_depths(tokenizer):
    a = make_sample(tokenizer, "niah_multikey", 4096, seed=0)
    assert 0.97 * (4096 - a.max_new_tokens) <= a.num_tokens <= 4096 - a.max_new_tokens
    depths = []
    for seed in range(8):
        s = make_sample(tokenizer, "niah_single", 1024, seed)
        text = s.messages[0]["content"]
        depths.append(text.index(f"is: {s.answers[0]}.") / len(text))
    assert min(depths) < 0.4 and max(depths) > 0.6, "needles spread over the context"


def test_records_and_code_answers_are_unambiguous(tokenizer):
    for seed in range(3):
        s = make_sample(tokenizer, "records_jsonl", 2048, seed)
        record_id = s.messages[-1]["content"].split("id ")[-1].split()[0]
        rows = [json.loads(line) for line in s.messages[0]["content"].splitlines() if line.startswith("{")]
        [row] = [r for r in rows if str(r["id"]) == record_id]
        field = s.messages[-1]["content"].split("The ")[1].split(" of")[0]
        assert str(row[field]) == s.answers[0]
        c = make_sample(tokenizer, "code_return", 2048, seed)
        name = c.messages[-1]["content"].split("`")[1]
        code = c.messages[0]["content"]
        assert code.count(f"def {name}(") == 1
        body = code[code.index(f"def {name}(") :].split("\n\n\n")[0].split("```")[0]
        assert body.rstrip().splitlines()[-1].strip() in (f"return {c.answers[0]}", f'return "{c.answers[0]}"')


def test_parse_policies_and_budgets():
    ps = parse_policies('full,dynsplit,big=dynsplit:{"block_size": 32, "delta": 8},dynsplit-fixed', {"alpha": 2.0})
    assert [p.label for p in ps] == ["full", "dynsplit", "big", "dynsplit-fixed"]
    assert ps[0].config == {} and ps[1].config == {"alpha": 2.0}
    assert ps[2].config == {"alpha": 2.0, "block_size": 32, "delta": 8}
    assert ps[3].config == {"alpha": 2.0, "split": "fixed_interval"}
    assert parse_policies('dynsplit:{"delta": 2}')[0].label == 'dynsplit:{"delta":2}'
    # serve_bench's form (no colon before the options) means the same
    assert parse_policies('big=dynsplit{"block_size": 32, "delta": 8}', {"alpha": 2.0})[0] == ps[2]
    assert parse_policies('dynsplit{"delta": 2}')[0] == parse_policies('dynsplit:{"delta": 2}')[0]
    for bad in ["full,full", 'full:{"a": 1}', 'full{"a": 1}', "dynsplit:{oops}", '{"a": 1}']:
        with pytest.raises(ValueError):
            parse_policies(bad)
    assert {p.config.get("split") for p in VARIANTS.values()} == {"fixed_interval", "punctuation", "dd_select"}
    assert budget_tokens(0.0625, 2048) == 128 and budget_tokens(512, 8192) == 512
    dense = engine_args(policy_engine_kwargs(ps[0], None), "m", 9000, "cpu")
    assert dense["attention_backend"] == "torch_native" and "kv" not in dense
    sparse = engine_args(policy_engine_kwargs(ps[2], 1024), "m", 9000, "cpu")
    assert (sparse["kv"], sparse["kv_budget"], sparse["kv_config"]) == ("dynsplit", 1024, ps[2].config)
    assert "disable_radix_cache" not in sparse and "attention_backend" not in sparse


def test_shared_engine_runs_every_policy_with_per_request_choices(tokenizer):
    ps = parse_policies('full,big=dynsplit:{"block_size": 32},snapkv,dynsplit,dynsplit-fixed')
    sample = make_sample(tokenizer, "niah_single", 512, seed=0)
    settings = Settings("m", (0.25, 64), "cpu", "shared")
    work = pending(ps, [sample], settings, {})
    assert len(work[0][1]) == 1 + 4 * 2
    ((kwargs, labels, items),) = engine_groups(ps, work, settings)
    # the first policy labelled with its own name is --kv; the others are variants under their labels
    assert (kwargs["kv"], kwargs["kv_budget"]) == ("snapkv", 512) and "kv_config" not in kwargs
    assert kwargs["kv_variants"] == {
        "big": {"policy": "dynsplit", "block_size": 32},
        "dynsplit": {"policy": "dynsplit"},
        "dynsplit-fixed": {"policy": "dynsplit", "split": "fixed_interval"},
    }
    assert labels == {"big": "big", "snapkv": "snapkv", "dynsplit": "dynsplit", "dynsplit-fixed": "dynsplit-fixed"}
    full, big = (
        request_params(sample, ps[0], None, labels, "shared"),
        request_params(sample, ps[1], 64, labels, "shared"),
    )
    assert full["custom_params"] == {"kv_budget": 512} and full["temperature"] == 0
    assert big["custom_params"] == {"kv_budget": 64, "kv_policy": "big"}
    # one engine per policy: full is SGLang's own attention, the others take budgets per request
    groups = engine_groups(ps, work, Settings("m", (0.25, 64), "cpu", "policy"))
    assert [g[0].get("kv") for g in groups] == [None, "dynsplit", "snapkv", "dynsplit", "dynsplit"]
    assert request_params(sample, ps[2], 0.25, {}, "policy")["custom_params"] == {"kv_budget": 128}
    # one engine per policy and budget: nothing per request
    groups = engine_groups(ps, work, Settings("m", (0.25, 64), "cpu", "budget"))
    assert [(g[0].get("kv"), g[0].get("kv_budget")) for g in groups][:3] == [
        (None, None),
        ("dynsplit", 128),
        ("dynsplit", 64),
    ]
    assert "custom_params" not in request_params(sample, ps[2], 0.25, {}, "budget")


def report_records():
    rng = random.Random(0)
    records = []
    for policy, settings in [("full", [None]), ("dynsplit", [0.25, 0.125])]:
        for task, family, scenario in [("a", "niah", "prose"), ("b", "code", "code"), ("c", "code", "code")]:
            for length in (1024, 2048):
                for b in settings:
                    for seed in range(2):
                        budget = length if b is None else budget_tokens(b, length)
                        records.append(
                            {
                                "policy": policy,
                                "task": task,
                                "family": family,
                                "scenario": scenario,
                                "length": length,
                                "seed": seed,
                                "budget_setting": b,
                                "budget": budget,
                                "fraction": budget / length,
                                "prompt_tokens": length - 20,
                                "score": rng.choice([0.0, 0.5, 1.0]),
                            }
                        )
    return records


def test_report(tmp_path, capsys):
    records = report_records()
    rows = aggregate(records)
    cell = [
        r
        for r in rows
        if (r["policy"], r["length"], r["budget_setting"], r["name"]) == ("dynsplit", 1024, 0.25, "code")
    ]
    expected = [
        r["score"]
        for r in records
        if (r["policy"], r["length"], r["budget_setting"], r["family"]) == ("dynsplit", 1024, 0.25, "code")
    ]
    assert cell[0]["accuracy"] == pytest.approx(sum(expected) / len(expected), abs=1e-4) and cell[0]["samples"] == 4
    everything = [
        r for r in rows if (r["policy"], r["length"], r["budget_setting"], r["group"]) == ("full", 2048, None, "all")
    ]
    per_task = [
        sum(r["score"] for r in records if (r["policy"], r["length"], r["task"]) == ("full", 2048, t)) / 2
        for t in "abc"
    ]
    assert everything[0]["accuracy"] == pytest.approx(sum(per_task) / 3, abs=1e-4), "'all' weighs every task alike"
    result = {"model": "m", "device": "d", "commit": "c", "date": "now", "command": "cmd", "accuracy": rows}
    table = markdown(result, "family")
    assert "| full | all |" in table and "| dynsplit | 128 (0.125) |" in table
    plot(result, str(tmp_path / "p.png"), "scenario")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"

    # --progress: the table of an unfinished run's saved answers, marked partial, nothing written
    out = tmp_path / "run.json"
    (tmp_path / "run.partial.jsonl").write_text(
        "".join(json.dumps({**r, "model": "m", "commit": "abc"}) + "\n" for r in records[:10])
    )
    assert progress_main(["--progress", "--out", str(out)]) == [
        {**r, "model": "m", "commit": "abc"} for r in records[:10]
    ]
    printed = capsys.readouterr().out
    assert (
        printed.startswith("PARTIAL: 10 answers for 10 prompts")
        and "| full | all |" in printed
        and "commit abc" in printed
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.png", "run.partial.jsonl"]
    # with dynsplit answers it adds the prompt-by-prompt comparison; a record being written is skipped
    lines = [json.dumps({**r, "model": "m", "commit": "abc"}) + "\n" for r in records]
    (tmp_path / "run.partial.jsonl").write_text("".join(lines) + lines[0][:40])
    assert len(progress_main(["--progress", "--out", str(out)])) == len(records)
    printed = capsys.readouterr().out
    assert "**dynsplit against each policy, prompt by prompt, 1024 tokens**" in printed and "| full | " in printed
    # --tasks: only those tasks' answers
    named = [{**r, "model": "m", "task": "niah_single" if r["task"] == "a" else r["task"]} for r in records]
    (tmp_path / "run.partial.jsonl").write_text("".join(json.dumps(r) + "\n" for r in named))
    assert progress_main(["--progress", "--tasks", "niah_single", "--out", str(out)]) == [
        r for r in named if r["task"] == "niah_single"
    ]
    assert "PARTIAL: 12 answers for 4 prompts" in capsys.readouterr().out
    # a finished run (no progress file): the same tables from its JSON, still nothing written
    (tmp_path / "run.partial.jsonl").unlink()
    out.write_text(json.dumps({"samples": named}))
    assert progress_main(["--progress", "--tasks", "niah_single", "--out", str(out)]) == [
        r for r in named if r["task"] == "niah_single"
    ]
    printed = capsys.readouterr().out
    assert printed.startswith(f"12 answers for 4 prompts in {out} (the finished run)") and "PARTIAL" not in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.png", "run.json"]
    # a gzipped result beside it (what runs write now) is the one read; X, X.json and X.json.gz name one run
    write_result({"samples": named[:3]}, str(out))
    for name in ("run", "run.json", "run.json.gz"):
        assert len(progress_main(["--progress", "--out", str(tmp_path / name)])) == 3
        printed = capsys.readouterr().out
        assert printed.startswith(f"3 answers for 3 prompts in {tmp_path / 'run.json.gz'} (the finished run)")


def test_result_files_gzipped_and_plain(tmp_path):
    """A run writes X.json.gz (gzipped JSON, the text plain files held); results are read from
    X.json.gz, else from the plain X.json that runs wrote before."""
    result = {"commit": "abc", "samples": [{"policy": "full", "score": 0.5}], "accuracy": []}
    assert run_base(str(tmp_path / "x.json.gz")) == run_base(str(tmp_path / "x.json")) == str(tmp_path / "x")
    assert result_path(str(tmp_path / "x.json")) == result_path(str(tmp_path / "x")) == str(tmp_path / "x.json.gz")
    assert find_result(str(tmp_path / "x.json.gz")) is None
    (tmp_path / "x.json").write_text(json.dumps({**result, "commit": "old"}, indent=1))
    assert find_result(str(tmp_path / "x.json.gz")) == str(tmp_path / "x.json")
    assert load_result(str(tmp_path / "x.json"))["commit"] == "old"
    path = write_result(result, str(tmp_path / "x.json"))
    assert path == str(tmp_path / "x.json.gz") and find_result(str(tmp_path / "x")) == path  # .gz preferred
    assert gzip.decompress((tmp_path / "x.json.gz").read_bytes()).decode() == json.dumps(result, indent=1)
    assert load_result(path) == result and load_result(str(tmp_path / "x.json"))["commit"] == "old"
    again = write_result(result, str(tmp_path / "x.json.gz"))  # the same result gives the same bytes
    assert (tmp_path / "x.json.gz").read_bytes() == gzip.compress(json.dumps(result, indent=1).encode(), 9, mtime=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json", "x.json.gz"] and again == path


def test_summary(tmp_path, capsys):
    """--summary: one table, a row per policy and a column per budget, each cell the mean over the
    lengths of the mean over tasks; `full` repeats its one value; read from the gzipped result."""
    assert [budget_name(b) for b in (0.25, 0.125, 0.0625, 0.3, 512)] == ["1/4", "1/8", "1/16", "0.3", "512 tokens"]
    records = [{**r, "model": "m"} for r in report_records()]
    rows = aggregate(records)
    every = {(r["policy"], r["length"], r["budget_setting"]): r["accuracy"] for r in rows if r["group"] == "all"}
    table = summary_markdown({"model": "m", "accuracy": rows})
    lines = table.splitlines()
    assert (
        lines[0].startswith(
            "**Accuracy per policy and KV budget** (m; the mean over 3 tasks at each length, "
            "then over the lengths 1024, 2048 tokens;"
        )
        and "up to 2 prompts per task" in lines[0]
    )
    assert lines[2] == "| policy | budget 1/4 | budget 1/8 |"
    full = (every[("full", 1024, None)] + every[("full", 2048, None)]) / 2
    dyn = [(every[("dynsplit", 1024, b)] + every[("dynsplit", 2048, b)]) / 2 for b in (0.25, 0.125)]
    assert lines[4] == f"| full (every token) | {full:.2f} | {full:.2f} |"
    assert lines[5] == f"| dynsplit | {dyn[0]:.2f} | {dyn[1]:.2f} |" and len(lines) == 6
    # an unfinished run: a cell missing a length is the mean of the others, marked
    short = summary_markdown(
        {
            "model": "m",
            "accuracy": aggregate([r for r in records if r["length"] == 1024 or r["budget_setting"] != 0.125]),
        }
    )
    assert f"| dynsplit | {dyn[0]:.2f} | {every[('dynsplit', 1024, 0.125)]:.2f}* |" in short
    assert "not every length answered yet" in short

    write_result({"samples": records}, str(tmp_path / "run.json"))
    assert progress_main(["--summary", "--out", str(tmp_path / "run.json")]) == records
    printed = capsys.readouterr().out
    head = f"{len(records)} answers for 12 prompts in {tmp_path / 'run.json.gz'} (the finished run)"
    assert printed == f"{head}\n\n{table}\n"


def test_load_partial_drops_a_cut_off_last_record(tmp_path, capsys):
    """A run killed mid-write leaves a last line without its newline: resuming drops it from the
    file (so new records start on a line of their own) and generates it again; a broken line
    elsewhere is an error that names the file and the line."""
    record = {
        "policy": "full",
        "config": {},
        "task": "niah_single",
        "length": 2048,
        "seed": 0,
        "budget_setting": None,
        "model": "m",
    }
    other = {**record, "seed": 1}
    path = tmp_path / "run.partial.jsonl"
    whole = json.dumps(record) + "\n" + json.dumps({**record, "model": "other"}) + "\n"
    path.write_text(whole + json.dumps(other)[:25])
    # a reader beside the running run (--progress) leaves the cut-off record out and the file as it is
    assert [r["model"] for r in saved_records(str(path))] == ["m", "other"]
    assert path.read_text() == whole + json.dumps(other)[:25] and saved_records(str(tmp_path / "absent.jsonl")) == []
    done = load_partial(str(path), "m")
    assert [r["seed"] for r in done.values()] == [0]
    assert path.read_text() == whole and "dropping an unfinished last record" in capsys.readouterr().err
    assert load_partial(str(tmp_path / "absent.jsonl"), "m") == {}
    path.write_text("{not json\n" + whole)
    with pytest.raises(ValueError, match="run.partial.jsonl, line 1: not a JSON record"):
        load_partial(str(path), "m")
    with pytest.raises(ValueError, match="run.partial.jsonl, line 1: not a JSON record"):
        saved_records(str(path))


def test_sign_test():
    assert sign_test(0, 0) == 1.0
    assert sign_test(5, 0) == pytest.approx(2 / 32) and sign_test(0, 5) == sign_test(5, 0)
    assert sign_test(3, 3) == 1.0
    assert sign_test(32, 58) == pytest.approx(0.0081, abs=2e-4)  # scipy.stats.binomtest(32, 90).pvalue


def test_paired():
    def rec(policy, setting, task, seed, score, length=2048):
        return {
            "policy": policy,
            "budget_setting": setting,
            "task": task,
            "length": length,
            "seed": seed,
            "score": score,
        }

    records = [rec("full", None, "a", s, 1.0) for s in range(4)]
    records += [rec("dynsplit", 0.25, "a", s, x) for s, x in enumerate([1.0, 0.0, 0.5, 1.0])]
    records += [rec("quest", 0.25, "a", s, x) for s, x in enumerate([0.0, 0.0, 1.0])]  # seed 3 not answered
    records += [rec("quest", 0.125, "a", 0, 1.0), rec("dynsplit", 0.125, "a", 0, 0.0)]
    records += [rec("quest", 0.25, "a", 0, 1.0, length=4096)]  # no dynsplit answer at 4096: no row
    rows = {(r["policy"], r["budget_setting"]): r for r in paired(records)}
    assert sorted(rows) == [("full", 0.125), ("full", 0.25), ("quest", 0.125), ("quest", 0.25)]
    assert {k: rows[("quest", 0.25)][k] for k in ("prompts", "better", "worse", "ties")} == {
        "prompts": 3,
        "better": 1,
        "worse": 1,
        "ties": 1,
    }
    assert (rows[("full", 0.25)]["better"], rows[("full", 0.25)]["worse"], rows[("full", 0.25)]["ties"]) == (0, 2, 2)
    assert rows[("quest", 0.125)]["worse"] == 1 and rows[("quest", 0.125)]["p"] == 1.0
    table = paired_markdown(list(rows.values()))
    assert "**dynsplit against each policy, prompt by prompt, 2048 tokens**" in table
    assert "| quest | 1 / 1 (p 1) | 0 / 1 (p 1) |" in table
    assert paired(records, reference="streamingllm") == []
