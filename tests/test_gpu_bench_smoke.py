"""The GPU benchmarks' --smoke mode on the CPU: the scripts run end to end and write the JSON rows.

--smoke swaps the Triton selection for its torch reference and FlashInfer for the torch stand-in
(dynsplit_sglang/testing/fake_flashinfer.py) on tiny shapes; the code around them is what the GPU run uses.
Each script runs in a subprocess, as `python -m` does on the GPU box (it also keeps --smoke's
single-thread setting out of this process).
"""

import json
import os
import subprocess
import sys

import pytest

from benchmarks.common import RESULTS
from benchmarks.gpu.common import output_path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = ("commit", "device", "date", "command", "torch", "triton", "flashinfer", "gpu")


def run_smoke(module, out, *extra):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", module, "--smoke", "--out", str(out), *extra],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out) as f:
        return json.load(f), proc.stdout


def results_snapshot():
    """The GPU results files (others may be written meanwhile, e.g. by an accuracy run)."""
    return {n: os.stat(os.path.join(RESULTS, n)).st_mtime_ns for n in os.listdir(RESULTS) if n.startswith("gpu_")}


def test_kernels_smoke(tmp_path):
    before = results_snapshot()
    # A batch of a million does not fit the smoke memory: it must be listed as skipped.
    result, stdout = run_smoke("benchmarks.gpu.kernels", tmp_path / "k.json", "--batches", "1", "2", "1000000")
    assert results_snapshot() == before  # nothing written into benchmarks/results
    assert all(result[k] for k in HEADER if k not in ("flashinfer", "gpu"))
    assert result["smoke"] is True and result["partial"] is False and not result["failed"]
    assert "--smoke" in result["command"] and result["command"].startswith("python -m benchmarks.gpu.kernels")
    assert [(s["context"], s["batch"]) for s in result["skipped"]] == [(96, 1000000), (160, 1000000)]
    rows = result["rows"]
    assert [(r["context"], r["batch"], r["budget"]) for r in rows] == [
        (c, b, k) for c in (96, 160) for b in (1, 2) for k in (56, 64)
    ]
    for r in rows:
        for key in ("select_ms", "sparse_ms", "full_ms", "select_share", "attn_speedup", "step_speedup"):
            assert r[key] > 0, (key, r)
        assert r["counts_ok"] and r["check_sparse"]["ok"] and r["check_full"]["ok"], r
        assert r["timing"] == "eager" and r["plan_ms"]["sparse"] >= 0 and r["plan_ms"]["full"] >= 0
        assert r["bytes_read"]["sparse_kv"] < r["bytes_read"]["full_kv"]
    tc = result["tensor_cores"]
    assert (tc["context"], tc["batch"], tc["budget"]) == (160, 1, 64)
    assert all(tc[f"{op}_{mode}"]["eager_ms"] > 0 for op in ("sparse", "full") for mode in ("on", "off"))
    assert set(result["compile_s"]) == {"triton_select_slots"} | {
        f"flashinfer_{op}_{mode}" for op in ("full", "folded") for mode in ("cuda_cores", "tensor_cores")
    }
    share, speed = result["targets"]["selection_share"], result["targets"]["attention_speedup"]
    assert share["context"] == 160 and len(share["per_config"]) == 4 and isinstance(share["holds"], bool)
    assert speed["budget"] == 64 and set(speed["per_batch"]) == {"1", "2"}
    assert "| context | batch | budget |" in stdout and "skipped: context 96 batch 1000000" in stdout


def test_decode_step_smoke(tmp_path):
    before = results_snapshot()
    result, stdout = run_smoke("benchmarks.gpu.decode_step", tmp_path / "d.json")
    assert results_snapshot() == before
    assert all(result[k] for k in HEADER if k not in ("flashinfer", "gpu"))
    assert result["smoke"] is True and result["partial"] is False and not result["failed"]
    assert "reused by all" in result["note"] and "triton_select_slots" in result["compile_s"]
    # The second setting takes the largest batch that fits, here capped by --max-batch (3 in smoke).
    assert [(s["context"], s["batch"]) for s in result["settings"]] == [(96, 2), (160, 3)]
    assert result["settings"][1]["full_fits"] >= result["settings"][1]["both_fit"] >= 3
    rows = result["rows"]
    assert [(r["context"], r["policy"], r["budget"]) for r in rows] == [
        (c, p, b) for c in (96, 160) for p, b in (("full", None), ("dynsplit", 56), ("dynsplit", 64))
    ]
    for r in rows:
        assert r["finite_logits"] and r["eager_ms"] > 0 and r["tokens_per_s"] > 0 and r["speedup"] > 0
        assert r["graph_ms"] is None and r["graph_error"]  # no CUDA graphs on the CPU
        assert r["breakable_ms"] is None and r["breakable_error"]
        assert r["kv_resident_bytes"] > 0
        if r["policy"] == "full":
            assert r["speedup"] == 1 and r["kv_read_bytes"] <= r["kv_resident_bytes"]  # all but padding slot 0
            assert r["records_resident_bytes"] == 0 and r["counts_ok"] is None
        else:
            assert r["kv_read_bytes"] < r["kv_resident_bytes"] and r["records_read_bytes"] > 0 and r["counts_ok"]
    target = result["targets"]["decode_step_speedup"]
    assert target["context"] == 160 and target["batch"] == 3 and set(target["per_budget"]) == {"56", "64"}
    assert "| context | batch | policy |" in stdout


def test_smoke_output_never_lands_in_results(tmp_path):
    assert not output_path("gpu_kernels.json", None, smoke=True).startswith(RESULTS)
    assert output_path("gpu_kernels.json", None, smoke=False) == os.path.join(RESULTS, "gpu_kernels.json")
    assert output_path("gpu_kernels.json", str(tmp_path / "x.json"), smoke=True) == str(tmp_path / "x.json")
    with pytest.raises(SystemExit, match="does not write into"):
        output_path("gpu_kernels.json", os.path.join(RESULTS, "x.json"), smoke=True)


def test_gpu_test_files_collect_without_sglang(tmp_path):
    """The GPU box has no SGLang: run_all.sh runs `pytest -m gpu` on the files that have gpu tests,
    so none of them may import SGLang (an import there fails the whole GPU test step)."""
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text(
        "import sys\n"
        "class _NoSGLang:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'sglang' or name.startswith('sglang.'):\n"
        "            raise ImportError('the GPU box has no ' + name)\n"
        "sys.meta_path.insert(0, _NoSGLang())\n"
    )
    files = sorted(
        os.path.join("tests", n)
        for n in os.listdir(os.path.join(REPO, "tests"))
        if n.startswith("test_")
        and n.endswith(".py")
        and "pytest.mark.gpu" in open(os.path.join(REPO, "tests", n)).read()
    )
    env = dict(os.environ, PYTHONPATH=str(tmp_path) + os.pathsep + REPO)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "benchmarks.gpu.source_tree",
            "-m",
            "gpu",
            "--collect-only",
            "-q",
            *files,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "error" not in proc.stdout.lower()


@pytest.mark.gpu
def test_breakable_graph_replays_segments_around_eager_breaks():
    """BreakableGraph, the decode-step benchmark's version of SGLang's breakable graphs: every
    replay feeds the captured GEMMs new inputs, and the break between them (host read,
    data-dependent shapes, as a policy's attention has) runs eagerly on the current values."""
    import torch

    from benchmarks.gpu.common import BreakableGraph

    torch.manual_seed(0)
    x, w = torch.randn(8, 64, device="cuda"), torch.randn(64, 64, device="cuda") / 8

    def attention(h):
        keep = (h.sum(1) > 0).nonzero()[:, 0].tolist()  # a host read and a data-dependent shape
        out = torch.zeros_like(h)
        out[keep] = h[keep] * 2
        return out

    graph = BreakableGraph()
    out = graph.capture(lambda: (graph.eager(attention, x @ w) @ w).sum(1))
    assert (len(graph.segments), len(graph.breaks)) == (2, 1)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, (attention(x @ w) @ w).sum(1))
