"""Decode throughput and memory of a real SGLang server, `--kv dynsplit` against `--kv full`.

Made for GPU boxes where SGLang installs (`make install`, or `pip install sglang==0.5.23` and this
repo):

    python -m benchmarks.serve_bench                 # Llama-3.1-8B-shaped model, random weights: full, dynsplit on
                                                     # the torch and on the FlashInfer backend, each eager and with
                                                     # breakable decode graphs; 32k x 8 requests, 128k x the
                                                     # largest batch full fits
    python -m benchmarks.serve_bench --model-path M  # a real model folder instead (weights still dummy)
    python -m benchmarks.serve_bench --smoke         # tiny random model on the CPU: checks the pipeline (CI)
    python -m benchmarks.serve_bench --cpu --kv full,dynsplit,quest,snapkv --kv-budget 1024 \
        --settings 4048x1,7048x4 --new-tokens 48     # SmolLM2-135M on the CPU recipe (fp32, 32k-token pool)

Each policy gets its own server (`python -m sglang.launch_server --load-format dummy
--skip-tokenizer-init --disable-radix-cache`): random prompt ids, greedy, `ignore_eos`, so every
request prefills its whole prompt and decodes exactly --new-tokens. A setting's requests are sent
at once and streamed. Decode throughput counts only the tokens made while every request of the
batch is decoding (after the last first token, before the first request finishes), so prefill and
ramp-up stay out of it. Memory: the server's own account (`/server_info`: weights, KV pool and its
token capacity) and the peak memory seen while the setting ran (nvidia-smi on a GPU, the server
processes' resident memory on a CPU). "Context" is the sequence length reached at the last
token: prompt = context - new tokens.

Prints a table and writes benchmarks/results/serve_bench.json (serve_bench_smoke.json for --smoke).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.common import RESULTS, ratio_text, run_info, save_result
from dynsplit_sglang.testing.server import cpu_args, start_server

# Llama-3.1-8B's shape (config.json of meta-llama/Llama-3.1-8B-Instruct, weights not needed).
LLAMA_8B_SHAPE = dict(
    architectures=["LlamaForCausalLM"],
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=128256,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    rope_scaling={
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    bos_token_id=128000,
    eos_token_id=128001,
    tie_word_embeddings=False,
    torch_dtype="bfloat16",
)


def llama_8b_shape_path() -> Path:
    """A model folder with only Llama-3.1-8B's config.json (for --load-format dummy), made once."""
    from transformers import LlamaConfig

    from dynsplit_sglang.default_model import cache_dir

    folder = cache_dir() / "llama-3.1-8b-shape"
    if not (folder / "config.json").exists():
        LlamaConfig(**LLAMA_8B_SHAPE).save_pretrained(folder)
    return folder


def longer_context(model: Path, max_position: int) -> Path:
    """A copy of a model folder's config (and tokenizer) with a longer context: enough for
    `--load-format dummy`, which makes random weights of the config's shape."""
    from dynsplit_sglang.default_model import cache_dir

    out = cache_dir() / f"{model.name}-shape-{max_position}"
    out.mkdir(parents=True, exist_ok=True)
    for f in model.iterdir():
        if f.suffix != ".safetensors" and f.name != "config.json":
            shutil.copy(f, out / f.name)
    with open(model / "config.json") as f:
        config = json.load(f)
    config["max_position_embeddings"] = max_position
    with open(out / "config.json", "w") as f:
        json.dump(config, f, indent=1)
    return out


@dataclass
class Setting:
    """One measured point: `batch` requests whose sequences reach `context` tokens."""

    context: int
    batch: int | None  # None: the largest batch the first policy's KV pool holds


def parse_settings(text: str) -> list[Setting]:
    """'32768x8,131072xmax' -> settings; a clear error for anything else."""
    settings = []
    for item in text.split(","):
        context, sep, batch = item.strip().partition("x")
        try:
            if not sep:
                raise ValueError
            setting = Setting(int(context), None if batch == "max" else int(batch))
        except ValueError:
            raise SystemExit(f"--settings: {item!r} is not CONTEXTxBATCH (e.g. 32768x8 or 131072xmax)") from None
        if setting.context <= 0 or (setting.batch is not None and setting.batch <= 0):
            raise SystemExit(f"--settings: {item!r} needs a positive context and batch")
        settings.append(setting)
    return settings


@dataclass
class Stream:
    """Arrival times of one streamed request's tokens."""

    times: list[float] = field(default_factory=list)  # one per chunk
    tokens: list[int] = field(default_factory=list)  # completion tokens so far, per chunk
    error: str | None = None

    def tokens_at(self, t: float) -> int:
        """Completion tokens received by time t."""
        n = 0
        for when, count in zip(self.times, self.tokens):
            if when > t:
                break
            n = count
        return n


def stream_request(url: str, input_ids: list[int], new_tokens: int, out: Stream) -> None:
    body = {
        "input_ids": input_ids,
        "sampling_params": {"temperature": 0, "max_new_tokens": new_tokens, "ignore_eos": True},
        "stream": True,
    }
    request = urllib.request.Request(
        url + "/generate", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=3600) as response:
            for raw in response:
                line = raw.decode().strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                if "error" in chunk:
                    out.error = str(chunk["error"])
                    return
                out.times.append(time.perf_counter())
                out.tokens.append(int(chunk["meta_info"]["completion_tokens"]))
    except OSError as e:
        out.error = f"{type(e).__name__}: {e}"


def decode_window(streams: list[Stream]) -> tuple[float, int]:
    """(seconds, tokens) of the stretch when every request was decoding: from the last first token
    to the first finish. (0, 0) when the requests never all decoded together."""
    start = max(s.times[0] for s in streams)
    end = min(s.times[-1] for s in streams)
    if end <= start:
        return 0.0, 0
    return end - start, sum(s.tokens_at(end) - s.tokens_at(start) for s in streams)


class PeakMemory:
    """Polls the memory in use in a thread and keeps the maximum (GiB)."""

    def __init__(self, read: Callable[[], float], every: float = 0.25):
        self.read, self.every, self.peak = read, every, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self):
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.read())
            except (OSError, ValueError, subprocess.SubprocessError):
                pass
            self._stop.wait(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.read())


def gpu_memory_gib() -> float:
    """Memory in use on the first visible GPU, as nvidia-smi reports it (the server is another process)."""
    index = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0]
    out = subprocess.run(
        ["nvidia-smi", "-i", index, "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    ).stdout
    return float(out.split()[0]) / 1024


def process_group_rss_gib(leader_pid: int) -> Callable[[], float]:
    """Resident memory of every process in the server's process group (GiB)."""
    import psutil

    def read() -> float:
        total = 0
        for p in psutil.process_iter(["pid"]):
            try:
                if os.getpgid(p.pid) == leader_pid:
                    total += p.memory_info().rss
            except (psutil.Error, ProcessLookupError):
                continue
        return total / 2**30

    return read


def server_memory(url: str) -> dict:
    """The server's own memory account: weights and KV pool (GB) and the pool's token capacity."""
    with urllib.request.urlopen(url + "/server_info", timeout=30) as r:
        info = json.load(r)
    usage = (info.get("internal_states") or [{}])[0].get("memory_usage", {})
    return {
        "weight_gb": usage.get("weight"),
        "kv_pool_gb": usage.get("kvcache"),
        "kv_pool_tokens": usage.get("token_capacity") or info.get("max_total_num_tokens"),
    }


def run_setting(url: str, context: int, batch: int, new_tokens: int, vocab: int, seed: int) -> dict:
    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab) for _ in range(context - new_tokens)] for _ in range(batch)]
    streams = [Stream() for _ in prompts]
    threads = [threading.Thread(target=stream_request, args=(url, p, new_tokens, s)) for p, s in zip(prompts, streams)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    errors = [s.error for s in streams if s.error or not s.times]
    if errors:
        raise RuntimeError(f"context {context} x {batch}: a request failed: {errors[0] or 'no tokens came back'}")
    seconds, tokens = decode_window(streams)
    steps = tokens / batch
    if not steps:
        print(
            f"  context {context} x {batch}: the requests never decoded all together (not all admitted at "
            f"once, or their tokens arrived in one chunk); no decode rate",
            flush=True,
        )
    return {
        "wall_s": round(time.perf_counter() - t0, 3),
        "first_token_s": round(max(s.times[0] for s in streams) - t0, 3),
        "decode_window_steps": round(steps, 1),
        "decode_tokens_per_s": round(tokens / seconds, 2) if seconds else None,
        "decode_step_ms": round(1000 * seconds / steps, 3) if steps else None,
    }


# What the backend labels in a decode step (torch.profiler.record_function), in the order the
# breakdown lists them; "gather" (the selected KV copied out of the pool) runs inside "attention".
PROFILE_LABELS = {
    "selection": "dynsplit:select",
    "gather": "dynsplit:gather",
    "attention": "dynsplit:attention",
    "dd_rows": "dynsplit:dd_rows",
    "step_setup": "dynsplit:begin_step",
    "step_commit": "dynsplit:end_step",
}


def post(url: str, path: str, body: dict, timeout: float = 60) -> bytes:
    request = urllib.request.Request(
        url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read()


def profile_setting(url: str, context: int, batch: int, vocab: int, seed: int, trace_dir: str, steps: int = 8) -> dict:
    """A breakdown of decode steps while all `batch` requests decode, from SGLang's own profiler
    (`/start_profile`, CPU activity, no stacks): per step, the ms of each of the backend's
    labelled parts and of the rest (the model's other layers and SGLang's scheduling). Times are
    under the profiler, which slows every op a little: read them as shares."""
    new_tokens = steps + 16
    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab) for _ in range(context - new_tokens)] for _ in range(batch)]
    streams = [Stream() for _ in prompts]
    threads = [threading.Thread(target=stream_request, args=(url, p, new_tokens, s)) for p, s in zip(prompts, streams)]
    for t in threads:
        t.start()
    os.makedirs(trace_dir, exist_ok=True)
    before = set(os.listdir(trace_dir))
    while not all(len(s.times) >= 2 or s.error for s in streams):  # every request is decoding
        time.sleep(0.02)
    post(
        url, "/start_profile", {"output_dir": trace_dir, "num_steps": steps, "activities": ["CPU"], "with_stack": False}
    )
    for t in threads:
        t.join()
    errors = [s.error for s in streams if s.error]
    if errors:
        raise RuntimeError(f"profile {context} x {batch}: a request failed: {errors[0]}")
    deadline = time.time() + 120
    while not (new := set(os.listdir(trace_dir)) - before) and time.time() < deadline:
        time.sleep(0.5)
    if not new:
        raise RuntimeError(f"profile {context} x {batch}: the server wrote no trace to {trace_dir}")
    path = os.path.join(trace_dir, sorted(new)[0])
    time.sleep(1)  # the file is written in one go; let it finish
    with gzip.open(path, "rt") if path.endswith(".gz") else open(path) as f:
        events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]
    return step_breakdown(events, batch)


def step_breakdown(events: list[dict], batch: int) -> dict:
    """ms per decode step of a batch of `batch`: the whole step (SGLang's `step[DECODE bs=N]`
    range), each labelled part, and the rest."""
    step_name = f"step[DECODE bs={batch}]"
    spans = [(e["ts"], e["ts"] + e["dur"]) for e in events if e["name"] == step_name]
    if not spans:
        raise RuntimeError(f"the trace holds no {step_name} range")

    def ms_in_steps(name: str) -> float:
        total = sum(e["dur"] for e in events if e["name"] == name and any(a <= e["ts"] < b for a, b in spans))
        return total / 1000 / len(spans)

    step = sum(b - a for a, b in spans) / 1000 / len(spans)
    parts = {part: ms_in_steps(label) for part, label in PROFILE_LABELS.items()}
    parts["attention"] -= parts["gather"]  # reported apart
    parts["rest"] = step - sum(parts.values())
    return {"steps": len(spans), "step_ms": round(step, 2), **{k: round(v, 2) for k, v in parts.items()}}


def max_batch(pool_tokens: int, context: int) -> int:
    """The largest batch of `context`-token sequences the KV pool holds, with 5% of the pool left
    for what SGLang's admission keeps in reserve (a batch that fills the pool exactly is not
    admitted at once, and its requests would not decode together)."""
    return max(1, int(0.95 * int(pool_tokens)) // context)


@dataclass(frozen=True)
class KvEntry:
    """One --kv entry: [LABEL=]POLICY[{JSON options}][:ATTENTION_BACKEND[:DECODE_GRAPHS]], e.g.
    `dynsplit:dynsplit_flashinfer:breakable` (SGLang's breakable decode CUDA graphs) or
    `C8=dynsplit{"block_size": 8}` (options as --kv-config; rows are named by LABEL, else by the
    entry as written). POLICY `dense`: our backend with a budget of the whole context, so every
    request attends densely (what our attention path costs without compression; on a hybrid
    model, its windowed sliding layers without compression)."""

    label: str
    policy: str
    options: dict = field(default_factory=dict)
    backend: str = ""
    graphs: str = ""

    @property
    def on_cpu(self) -> bool:
        """Whether the CPU runs it (no FlashInfer backend, no CUDA graphs)."""
        return not (self.backend or self.graphs)


def parse_entry(text: str) -> KvEntry:
    """A --kv entry (see KvEntry); a malformed one is one clear error."""
    from dynsplit_sglang.config import parse_json_object

    label, rest = None, text.strip()
    if "=" in rest.split("{", 1)[0].split(":", 1)[0]:
        label, rest = rest.split("=", 1)
        if not label.strip():
            raise SystemExit(f"--kv: entry {text!r} has an empty label before '='")
    options = {}
    if "{" in rest:
        start, end = rest.index("{"), rest.rfind("}")
        if end < start:
            raise SystemExit(f"--kv: entry {text!r}: its options do not close with '}}'")
        try:
            options = parse_json_object(rest[start : end + 1], f"the options of --kv entry {text!r}")
        except ValueError as e:
            raise SystemExit(f"--kv: {e}") from None
        rest = rest[:start] + rest[end + 1 :]
    policy, backend, graphs = (rest.split(":") + ["", ""])[:3]
    if not policy:
        raise SystemExit(f"--kv: entry {text!r} names no policy")
    if policy == "full" and options:
        raise SystemExit(f"--kv: entry {text!r}: full takes no options")
    return KvEntry(label or text.strip(), policy, options, backend, graphs)


def parse_entries(text: str) -> list[KvEntry]:
    """The --kv list: entries split at commas outside options; labels must differ."""
    from benchmarks.accuracy.policies import split_top_level

    entries = [parse_entry(e) for e in split_top_level(text)]
    labels = [e.label for e in entries]
    if len(set(labels)) != len(labels):
        raise SystemExit(f"--kv: two entries have the same label ({', '.join(labels)})")
    return entries


def server_args(setting: str | KvEntry, budget: int, context_length: int) -> list[str]:
    """Server flags for a --kv entry (see KvEntry)."""
    entry = parse_entry(setting) if isinstance(setting, str) else setting
    policy = entry.policy
    if policy == "dense":
        policy, budget = "dynsplit", context_length
    flags = ["--load-format", "dummy", "--skip-tokenizer-init", "--disable-radix-cache", "--kv", policy]
    if policy != "full":
        flags += ["--kv-budget", str(budget)]
    if entry.options:
        flags += ["--kv-config", json.dumps(entry.options, separators=(",", ":"))]
    return (
        flags
        + (["--attention-backend", entry.backend] if entry.backend else [])
        + (["--cuda-graph-backend-decode", entry.graphs] if entry.graphs else [])
    )


def row_budget(setting: str | KvEntry, budget: int) -> int | None:
    """The budget a result row is labelled with: none for `full` and `dense`, which attend to
    every token (dense's server budget is the whole context, not --kv-budget)."""
    entry = parse_entry(setting) if isinstance(setting, str) else setting
    return None if entry.policy in ("full", "dense") else budget


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-path", default=None, help="model folder (default: a Llama-3.1-8B-shaped config)")
    p.add_argument(
        "--kv",
        default="full,dynsplit,dynsplit::breakable,dynsplit:dynsplit_flashinfer,dynsplit:dynsplit_flashinfer:breakable",
        help="policies, one server each, in this order (dense: our backend, every request dense); "
        "POLICY:BACKEND picks the attention backend "
        "(dynsplit: the torch backend, dynsplit_flashinfer: the FlashInfer subclass), "
        "POLICY:BACKEND:breakable (BACKEND may be empty) adds breakable decode CUDA graphs; "
        'LABEL=POLICY{"option": value} gives the policy options (--kv-config) and names its rows LABEL',
    )
    p.add_argument("--kv-budget", type=int, default=4096)
    p.add_argument(
        "--settings",
        default="32768x8,131072xmax",
        help="CONTEXTxBATCH,...; BATCH 'max' is the largest batch the first policy's KV pool holds",
    )
    p.add_argument("--new-tokens", type=int, default=256, help="tokens each request decodes")
    p.add_argument("--server-args", default="", help="extra flags for every server, e.g. '--mem-fraction-static 0.85'")
    p.add_argument("--smoke", action="store_true", help="tiny random model on the CPU, short contexts: pipeline check")
    p.add_argument(
        "--cpu",
        action="store_true",
        help="serve on the CPU (fp32, --max-total-tokens 32768); default model: SmolLM2-135M's shape",
    )
    p.add_argument("--compare", default="snapkv", help="the policy each row is also compared with (vs column)")
    p.add_argument(
        "--profile",
        default=None,
        metavar="CONTEXTxBATCH",
        help="after the settings, profile a few decode steps of this load on every server (SGLang's /start_profile) "
        "and report where a step's time goes",
    )
    p.add_argument("--max-total-tokens", type=int, default=None, help="KV pool tokens (CPU default 32768)")
    p.add_argument(
        "--max-position",
        type=int,
        default=None,
        help="with --cpu: SmolLM2's shape with this context length (max_position_embeddings; weights are random)",
    )
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/serve_bench[_smoke].json)")
    args = p.parse_args(argv)

    info = run_info()
    entries = parse_entries(args.kv)
    if args.smoke or args.cpu:
        entries = [e for e in entries if e.on_cpu]
    if args.smoke:
        from dynsplit_sglang.default_model import tiny_model_path

        model, device_args = str(tiny_model_path()), cpu_args(4096)
        settings, new_tokens, budget = [Setting(512, 2), Setting(1024, None)], 16, 128
        args.profile = args.profile or "512x2"
    elif args.cpu:
        from dynsplit_sglang.default_model import smollm2_path

        model, device_args = args.model_path or str(smollm2_path()), cpu_args(args.max_total_tokens or 32768)
        if args.max_position:
            model = str(longer_context(Path(model), args.max_position))
        settings, new_tokens, budget = parse_settings(args.settings), args.new_tokens, args.kv_budget
    else:
        model = args.model_path or str(llama_8b_shape_path())
        device_args = []
        settings, new_tokens, budget = parse_settings(args.settings), args.new_tokens, args.kv_budget
    profile = parse_settings(args.profile)[0] if args.profile else None
    for s in settings:
        if s.context <= new_tokens:
            raise SystemExit(f"--settings: context {s.context} must exceed --new-tokens {new_tokens}")
    with open(os.path.join(model, "config.json")) as f:
        config = json.load(f)
    vocab = config.get("text_config", config)["vocab_size"]
    name = "serve_bench_smoke" if args.smoke else "serve_bench_cpu" if args.cpu else "serve_bench"
    out = args.out or os.path.join(RESULTS, name + ".json")
    log_dir = out.removesuffix(".json") + "_logs"
    os.makedirs(log_dir, exist_ok=True)
    on_gpu = not (args.smoke or args.cpu)

    rows, batches, profiles = [], {}, []
    for entry in entries:
        policy = entry.label
        file_name = re.sub(r"[^\w.-]+", "_", policy)  # a label may hold JSON options
        log = os.path.join(log_dir, file_name + ".log")
        print(f"[{policy}] starting the server (log: {log})", flush=True)
        extra = server_args(entry, budget, config.get("text_config", config)["max_position_embeddings"])
        extra += args.server_args.split()
        if not on_gpu and entry.policy == "full":
            extra += ["--attention-backend", "torch_native"]  # SGLang's CPU attention
        with start_server(model, *extra, device_args=device_args, timeout=1800, log_path=log) as (url, proc):
            memory = server_memory(url)
            run_setting(url, 64 + 4, 1, 4, vocab, seed=0)  # warm-up: lazy init, kernel compilation
            read = gpu_memory_gib if on_gpu else process_group_rss_gib(proc.pid)
            for i, s in enumerate(settings):
                if i not in batches:  # 'max' is resolved once, on the first policy's pool
                    batches[i] = s.batch or max_batch(memory["kv_pool_tokens"], s.context)
                batch = batches[i]
                print(f"[{policy}] context {s.context} x {batch} requests ...", flush=True)
                with PeakMemory(read) as peak:
                    measured = run_setting(url, s.context, batch, new_tokens, vocab, seed=1 + i)
                row = {
                    "policy": policy,
                    "budget": row_budget(entry, budget),
                    "context": s.context,
                    "batch": batch,
                    "new_tokens": new_tokens,
                    **measured,
                    **memory,
                    "peak_memory_gib": round(peak.peak, 3),
                }
                rows.append(row)
                print(
                    f"[{policy}]   {row['decode_tokens_per_s']} tok/s, step {row['decode_step_ms']} ms, "
                    f"peak {row['peak_memory_gib']} GiB",
                    flush=True,
                )
            if profile is not None and entry.policy != "full":  # full runs SGLang's own backend: no labels
                print(f"[{policy}] profiling decode steps of {profile.context} x {profile.batch} ...", flush=True)
                trace_dir = os.path.join(log_dir, "trace_" + file_name)
                breakdown = profile_setting(url, profile.context, profile.batch, vocab, 99, trace_dir)
                profiles.append({"policy": policy, "context": profile.context, "batch": profile.batch, **breakdown})
                print(f"[{policy}]   {breakdown}", flush=True)

    result = {
        **info,
        "model": model,
        "model_shape": {
            k: config.get(k) for k in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_size")
        },
        "memory_source": "nvidia-smi memory.used" if on_gpu else "server process group RSS",
        "args": {k: v for k, v in vars(args).items()},
        "rows": rows,
        "profile": profiles,
    }
    save_result(out, result, markdown(result))
    plot(result, out.removesuffix(".json") + ".png")
    return result


def markdown(result: dict) -> str:
    """The README tables: one row per policy and setting with its speed-up over full and over the
    compared policy; then the profile breakdown, if one was taken."""
    compare = result["args"].get("compare") or "snapkv"
    by = {(r["policy"], r["context"], r["batch"]): r for r in result["rows"]}
    lines = [
        f"| policy | context | batch | decode tok/s | step ms | vs full | vs {compare} | KV pool GB | peak GiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        rate = r["decode_tokens_per_s"]
        ref = by.get(("full", r["context"], r["batch"]), {}).get("decode_tokens_per_s")
        other = by.get((compare, r["context"], r["batch"]), {}).get("decode_tokens_per_s")
        name = r["policy"] + ("" if r["budget"] is None else f" ({r['budget']})")
        lines.append(
            f"| {name} | {r['context']} | {r['batch']} | {rate} | {r['decode_step_ms']} | "
            f"{'' if r['policy'] == 'full' else ratio_text(rate, ref)} | "
            f"{'' if r['policy'] in ('full', compare) else ratio_text(rate, other)} | {r['kv_pool_gb']} | "
            f"{r['peak_memory_gib']} |"
        )
    profiles = result.get("profile") or []
    if profiles:
        parts = ["selection", "gather", "attention", "dd_rows", "step_setup", "step_commit", "rest"]
        p0 = profiles[0]
        lines += [
            "",
            f"Where a decode step's time goes, {p0['context']} x {p0['batch']} (ms per step under SGLang's profiler; "
            "share of the step):",
            "",
            "| policy | step ms | " + " | ".join(parts) + " |",
            "| --- | ---: | " + " | ".join("---:" for _ in parts) + " |",
        ]
        for p in profiles:
            if p["policy"].startswith("full"):  # no labelled parts (older runs profiled it)
                continue
            cells = [f"{p[k]:.1f} ({100 * p[k] / p['step_ms']:.0f}%)" for k in parts]
            lines.append(f"| {p['policy']} | {p['step_ms']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\n{result['device']}, {result['date']}, commit {result['commit']}"


def plot(result: dict, path: str) -> None:
    """Decode throughput against context length, a line per policy, a panel per batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in result["rows"]})
    fig, axes = plt.subplots(1, len(batches), figsize=(4.2 * len(batches), 3.4), squeeze=False)
    policies = list(dict.fromkeys(r["policy"] for r in result["rows"]))
    for ax, batch in zip(axes[0], batches):
        contexts = sorted({r["context"] for r in result["rows"] if r["batch"] == batch})
        if len(contexts) == 1:  # one point per policy: bars read better than dots
            rates = {r["policy"]: r["decode_tokens_per_s"] or 0 for r in result["rows"] if r["batch"] == batch}
            ax.bar(list(rates), list(rates.values()), color=[f"C{policies.index(p)}" for p in rates])
            ax.set_title(f"batch {batch}, context {contexts[0]}")
            ax.set_ylabel("decode tokens/s")
            ax.grid(alpha=0.3, axis="y")
            continue
        for i, policy in enumerate(policies):
            rows = sorted(
                (
                    r
                    for r in result["rows"]
                    if r["policy"] == policy and r["batch"] == batch and r["decode_tokens_per_s"]
                ),
                key=lambda r: r["context"],
            )
            if rows:
                ax.plot(
                    [r["context"] for r in rows],
                    [r["decode_tokens_per_s"] for r in rows],
                    "o-",
                    color=f"C{i}",
                    label=policy,
                )
        ax.set_title(f"batch {batch}")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("decode tokens/s")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{result['device']}, commit {result['commit']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
