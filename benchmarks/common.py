"""What every benchmark records next to its numbers: commit, device, date and the exact command."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def git_commit() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        # Results are not code: the accuracy run's committed progress file changes as it runs.
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU: {model}, {os.cpu_count()} cores"


def cpu_model(smoke: bool) -> tuple[str, int]:
    """(model folder, vocabulary size) of the CPU benchmarks: SmolLM2-135M-Instruct, or the tiny
    random Llama for --smoke."""
    from dynsplit_sglang.default_model import smollm2_path, tiny_model_path

    model = str(tiny_model_path() if smoke else smollm2_path())
    with open(os.path.join(model, "config.json")) as f:
        return model, json.load(f)["vocab_size"]


def ratio_text(value, reference) -> str:
    """'1.23x' of value over reference; '' when either is missing or zero."""
    return f"{value / reference:.2f}x" if value and reference else ""


def output_paths(name: str, out: str | None, smoke: bool) -> tuple[str, str]:
    """(the JSON to write: `out`, else results/NAME.json or NAME_smoke.json; the folder beside it
    for the servers' logs, created)."""
    out = out or os.path.join(RESULTS, f"{name}_smoke.json" if smoke else f"{name}.json")
    log_dir = out.removesuffix(".json") + "_logs"
    os.makedirs(log_dir, exist_ok=True)
    return out, log_dir


def save_result(out: str, result: dict, table: str) -> None:
    """Write a benchmark's JSON and print its table."""
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(table)
    print(f"wrote {out}")


def main_module() -> str:
    """The module `python -m` ran: `benchmarks.accuracy.head_budgets`, `benchmarks.accuracy` for a
    package's __main__ (not only the file's name: the subpackages' modules were misnamed)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        return spec.name.removesuffix(".__main__")
    return "benchmarks." + os.path.basename(sys.argv[0]).removesuffix(".py")


def run_info() -> dict:
    return {
        "commit": git_commit(),
        "device": device_name(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(
            shlex.quote(a)
            for a in [
                os.path.basename(sys.executable),
                "-m",
                main_module(),
                *sys.argv[1:],
            ]
        ),
        "torch": torch.__version__,
    }
