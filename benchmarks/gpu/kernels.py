"""One attention layer at Llama-3.1-8B shapes: DynSplit-KV selection + sparse decode vs full decode.

    python -m benchmarks.gpu.kernels                 # H100: 8k/32k/128k x batch 1/8/32 x budget 2048/4096
    python -m benchmarks.gpu.kernels --smoke --out /tmp/k.json   # tiny shapes on the CPU (CI)

Per config, on the same KV tensors (32 query heads, 8 KV heads, head dim 128, bf16, page size 1):
  selection  `select_slots`: Quest scores of every closed block, the budget filled in score
             order, kept positions expanded to KV slots [B, KvH, budget] (Triton, 3 launches)
  sparse     `FoldedSparseDecode.write_indices` + `run` (FlashInfer fa2, KV heads folded into
             the batch), planned once per step (plan time reported apart)
  full       FlashInfer's BatchDecodeWithPagedKVCacheWrapper over every slot of every request,
             as SGLang plans `--kv full` (fa2, NHD, page size 1, 8 KV heads)
Each is timed eagerly and replayed from a CUDA graph (the decode path SGLang serves with); the
graph replay is the GPU time the targets use, eager adds Python launch overhead. The block
layout is synthetic: blocks of 12..20 tokens (the splitter's C=16, delta=4) tile each sequence
but an open tail, with random bf16 key bounds per record; sink 4, recent window 32.

Writes benchmarks/results/gpu_kernels.json (or --out) after every config, prints markdown tables.
"""

from __future__ import annotations

import argparse
import gc
import time

import torch

from benchmarks.gpu.common import (
    BLOCK_MAX,
    BLOCK_MIN,
    KEEP_HEAD,
    RECENT,
    GiB,
    capture,
    check_attention,
    expected_blocks,
    footer,
    full_decode_plan,
    header,
    host_ms,
    kv_bytes,
    log,
    make_layout,
    markdown,
    median_ms,
    random_bounds,
    record_bytes,
    short_error,
    start,
    use_tensor_cores,
    write_json,
)
from dynsplit_sglang.sparse_decode_flashinfer import FoldedSparseDecode

GPU_GRID = dict(contexts=[8192, 32768, 131072], batches=[1, 8, 32], budgets=[2048, 4096])
# Smoke budgets must cover sink + recent window + open block (4 + 32 + up to 19) to be filled exactly.
SMOKE_GRID = dict(contexts=[96, 160], batches=[1, 2], budgets=[56, 64])
# Where the issue's targets are read: the longest context; attention speedup at this budget.
TARGET_BUDGET = 4096
TARGET_SHARE, TARGET_SPEEDUP = 0.10, 5.0


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, torch stand-ins (CI check)")
    p.add_argument("--out", help="JSON path (default benchmarks/results/gpu_kernels.json; a temp file with --smoke)")
    p.add_argument("--contexts", type=int, nargs="+")
    p.add_argument("--batches", type=int, nargs="+")
    p.add_argument("--budgets", type=int, nargs="+")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args(argv)
    grid = SMOKE_GRID if args.smoke else GPU_GRID
    for key in grid:
        if getattr(args, key) is None:
            setattr(args, key, grid[key])
    if args.smoke:
        args.warmup, args.reps = 1, 2
    return args


# --- timing of one operation -------------------------------------------------------------------


def time_op(env, fn, warmup: int, reps: int) -> dict:
    """Median ms of fn eagerly and replayed from a CUDA graph (None + the error if capture fails)."""
    result = {"eager_ms": median_ms(env, fn, warmup, reps), "graph_ms": None, "graph_error": None}
    if not env.cuda:
        result["graph_error"] = "no CUDA (smoke run)"
        return result
    try:
        graph = capture(fn)
        result["graph_ms"] = median_ms(env, graph.replay, warmup, reps)
        del graph
    except Exception as e:  # noqa: BLE001 - report and go on with the eager number
        result["graph_error"] = short_error(e)
        torch.cuda.synchronize()
    return result


# --- one configuration -------------------------------------------------------------------------


class Problem:
    """One layer's KV pool, block records and queries for a batch, with full decode planned on it.

    k, v: [num_slots, KvH, D]; kmin, kmax: [capacity, KvH, D]; q: [B, H, D]."""

    def __init__(self, env, shapes, batch: int, context: int, seed: int = 0):
        self.env, self.shapes = env, shapes
        self.heads, self.kv_heads, self.dim = shapes["num_heads"], shapes["num_kv_heads"], shapes["head_dim"]
        self.scale = self.dim**-0.5
        self.layout = make_layout(batch, context, env.device, seed)
        torch.manual_seed(seed)
        shape = (self.layout.num_slots, self.kv_heads, self.dim)
        self.k = torch.empty(shape, dtype=env.dtype, device=env.device).normal_()
        self.v = torch.empty(shape, dtype=env.dtype, device=env.device).normal_()
        self.kmin, self.kmax = random_bounds(self.layout.capacity, self.kv_heads, self.dim, env.dtype, env.device)
        self.q = torch.randn(batch, self.heads, self.dim, dtype=env.dtype, device=env.device)
        self.pages = (self.k.view(-1, 1, self.kv_heads, self.dim), self.v.view(-1, 1, self.kv_heads, self.dim))

    def full(self, tensor_cores: bool):
        """(planned CUDA-graph-mode full decode wrapper, its plan function)."""
        return full_decode_plan(self.env, self.layout, self.heads, self.kv_heads, self.dim, tensor_cores)

    def sparse(self, budget: int, tensor_cores: bool) -> tuple[FoldedSparseDecode, object]:
        """(planned FoldedSparseDecode for this batch at `budget`, its plan function)."""
        sparse = FoldedSparseDecode(
            self.env.sparse_wrapper_factory(tensor_cores),
            self.kv_heads,
            self.heads // self.kv_heads,
            self.dim,
            max_requests=self.layout.batch,
            max_out=budget,
            device=self.env.device,
        )
        counts = [min(budget, self.layout.context)] * self.layout.batch  # the budget is filled exactly

        def plan():
            sparse.plan(counts, budget, self.env.dtype, self.env.dtype, self.scale)

        plan()
        return sparse, plan

    def selection(self, budget: int):
        """(select() running the selection into fixed buffers, slots [B, KvH, budget], counts [B, KvH])."""
        batch = self.layout.batch
        slots = torch.zeros(batch, self.kv_heads, budget, dtype=torch.int64, device=self.env.device)
        counts = torch.zeros(batch, self.kv_heads, dtype=torch.int32, device=self.env.device)
        inputs = self.layout.select_inputs(budget)

        def select():
            self.env.select(self.q, self.kmin, self.kmax, **inputs, slots_out=slots, counts_out=counts)

        return select, slots, counts


def config_bytes(shapes, batch: int, context: int, budgets: list[int], margin: int) -> int:
    """Device memory one config needs beyond what is already allocated (estimate, generous)."""
    kvh, d = shapes["num_kv_heads"], shapes["head_dim"]
    tokens = batch * context
    kv = kv_bytes(tokens + 1, 1, kvh, d)
    records = record_bytes(batch * expected_blocks(context), 1, kvh, d)
    index = tokens * 8 * 3  # req_slots (int64), full decode indices + graph buffer (int32), layout temporaries
    selection = batch * kvh * max(budgets) * 8 * 6  # slots, folded copy, dest, indices; eager + graph pools
    scratch = batch * kvh * expected_blocks(context) * 20 * 2 + context * d * 4 * 4  # select scratch, checks
    return kv + records + index + selection + scratch + margin  # margin: graph pools, FlashInfer outputs


def run_budget(problem: Problem, budget: int, tensor_cores: bool, args) -> dict:
    """Selection and sparse attention at one budget: timings, plan time and checks (a row, less full)."""
    env, layout = problem.env, problem.layout
    select, slots, counts = problem.selection(budget)
    env.sync()
    t = time.perf_counter()
    select()  # the first call compiles the Triton kernels for this block count (power of 2)
    env.sync()
    first_call_s = time.perf_counter() - t
    expected = min(budget, layout.context)
    counts_ok = bool((counts == expected).all())

    sparse, plan = problem.sparse(budget, tensor_cores)
    plan_ms = host_ms(env, plan, 3)

    def attend():
        sparse.write_indices(slots)
        return sparse.run(problem.q, problem.k, problem.v)

    timings = {
        "select": time_op(env, select, args.warmup, args.reps),
        "sparse": time_op(env, attend, args.warmup, args.reps),
    }
    select()
    out, _ = attend()
    check = check_attention(out[0], problem.q[0], problem.k, problem.v, slots[0, :, :expected], problem.scale)
    kvh, d, itemsize = problem.kv_heads, problem.dim, problem.k.element_size()
    nb = layout.num_blocks
    return {
        "context": layout.context,
        "batch": layout.batch,
        "budget": budget,
        "tensor_cores": tensor_cores,
        "num_blocks": nb,
        "nb_p2": max(16, 1 << max(nb - 1, 0).bit_length()),
        "layout_stats": layout.stats,
        "timings": timings,
        "plan_ms": {"sparse": plan_ms},
        "select_first_call_s": first_call_s,
        "counts_ok": counts_ok,
        "check_sparse": check,
        "bytes_read": {
            "selection_records": record_bytes(layout.capacity, 1, kvh, d, itemsize),
            "sparse_kv": kv_bytes(layout.batch * expected, 1, kvh, d, itemsize),
            "full_kv": kv_bytes(layout.batch * layout.context, 1, kvh, d, itemsize),
        },
    }


def finish_row(row: dict) -> dict:
    """The compared numbers: graph replays when all three ops were captured, else eager for all."""
    t = row["timings"]
    graph = all(t[op]["graph_ms"] is not None for op in ("select", "sparse", "full"))
    ms = {op: t[op]["graph_ms" if graph else "eager_ms"] for op in ("select", "sparse", "full")}
    row.update(
        timing="graph" if graph else "eager",
        select_ms=ms["select"],
        sparse_ms=ms["sparse"],
        full_ms=ms["full"],
        select_share=ms["select"] / (ms["select"] + ms["sparse"]),
        attn_speedup=ms["full"] / ms["sparse"],
        step_speedup=ms["full"] / (ms["select"] + ms["sparse"]),
    )
    row["eager"] = {f"{op}_ms": t[op]["eager_ms"] for op in ("select", "sparse", "full")}
    row["graph_errors"] = {op: t[op]["graph_error"] for op in t if t[op]["graph_error"]}
    b = row["bytes_read"]
    row["GBps"] = {
        "select": b["selection_records"] / ms["select"] / 1e6,
        "sparse": b["sparse_kv"] / ms["sparse"] / 1e6,
        "full": b["full_kv"] / ms["full"] / 1e6,
    }
    return row


def tensor_core_check(problem: Problem, budget: int, args) -> dict:
    """The folded (group 4) and the full call with FlashInfer's use_tensor_cores off and on."""
    select, slots, _ = problem.selection(budget)
    select()
    out = {
        "context": problem.layout.context,
        "batch": problem.layout.batch,
        "budget": budget,
        "sglang_rule": use_tensor_cores(problem.heads, problem.kv_heads),
    }
    for tc in (False, True):
        sparse, _ = problem.sparse(budget, tc)

        def attend(sparse=sparse):
            sparse.write_indices(slots)
            return sparse.run(problem.q, problem.k, problem.v)

        full, _ = problem.full(tc)
        key = "on" if tc else "off"
        out[f"sparse_{key}"] = time_op(problem.env, attend, args.warmup, args.reps)
        out[f"full_{key}"] = time_op(
            problem.env, lambda full=full: full.run(problem.q, problem.pages), args.warmup, args.reps
        )
        del sparse, full
    return out


def run_config(env, shapes, batch: int, context: int, args, tc_budget: int | None) -> tuple[list[dict], dict | None]:
    """Every budget at one (context, batch); full decode once. Returns (rows, tensor-core check or None)."""
    problem = Problem(env, shapes, batch, context)
    tc = use_tensor_cores(problem.heads, problem.kv_heads)
    full, plan = problem.full(tc)
    full_timing = time_op(env, lambda full=full: full.run(problem.q, problem.pages), args.warmup, args.reps)
    full_plan_ms = host_ms(env, plan, 3)
    out = full.run(problem.q, problem.pages)
    every = problem.layout.req_slots[0, :context][None].expand(problem.kv_heads, -1)
    full_check = check_attention(out[0], problem.q[0], problem.k, problem.v, every, problem.scale)
    del full, plan, out
    rows = []
    for budget in args.budgets:
        row = run_budget(problem, budget, tc, args)
        row["timings"]["full"] = full_timing
        row["plan_ms"]["full"] = full_plan_ms
        row["check_full"] = full_check
        finish_row(row)
        rows.append(row)
        log(
            f"  budget {budget} ({row['num_blocks']} blocks, sorted as {row['nb_p2']}): "
            f"select {row['select_ms']:.3f} ms, sparse {row['sparse_ms']:.3f} ms, "
            f"full {row['full_ms']:.3f} ms ({row['timing']}), share {row['select_share']:.2f}, "
            f"attention x{row['attn_speedup']:.1f}, checks {'ok' if check_ok(row) else 'FAILED'}"
        )
    tc_result = None
    if tc_budget:
        try:
            tc_result = tensor_core_check(problem, tc_budget, args)
        except Exception as e:  # noqa: BLE001 - keep this config's rows
            if env.smoke:
                raise
            tc_result = {"context": context, "batch": batch, "budget": tc_budget, "error": short_error(e)}
    return rows, tc_result


def check_ok(row: dict) -> bool:
    return row["counts_ok"] and row["check_sparse"]["ok"] and row["check_full"]["ok"]


# --- compile warm-up, targets, report ----------------------------------------------------------


def warm_up(env, shapes) -> dict:
    """Seconds of the first call of each distinct kernel on a tiny problem: FlashInfer's JIT
    compile (decode module; prefill module for tensor cores) and Triton's, on a fresh box."""
    problem = Problem(env, shapes, batch=2, context=256)
    budget = 64
    seconds = {}

    def first(name, fn):
        env.sync()
        t = time.perf_counter()
        try:
            fn()
            env.sync()
            seconds[name] = time.perf_counter() - t
            log(f"  {name}: {seconds[name]:.1f} s")
        except Exception as e:  # noqa: BLE001 - e.g. a failed JIT build: the configs then fail and say so too
            if env.smoke:
                raise
            seconds[name] = f"failed after {time.perf_counter() - t:.0f} s: {short_error(e)}"
            log(f"  {name}: {seconds[name]}")

    select, slots, _ = problem.selection(budget)
    first("triton_select_slots", select)
    for tc in (False, True):
        key = "tensor_cores" if tc else "cuda_cores"
        first(f"flashinfer_full_{key}", lambda tc=tc: problem.full(tc)[0].run(problem.q, problem.pages))

        def folded(tc=tc):
            sparse, _ = problem.sparse(budget, tc)
            sparse.write_indices(slots)
            sparse.run(problem.q, problem.k, problem.v)

        first(f"flashinfer_folded_{key}", folded)
    return seconds


def targets(rows: list[dict], context: int, budget: int) -> dict:
    """The issue's targets at the longest context: selection <= 10% of selection + sparse
    attention (every batch and budget), and sparse attention >= 5x faster than full at `budget`."""
    at = [r for r in rows if r["context"] == context]
    at_budget = [r for r in at if r["budget"] == budget]
    share = max((r["select_share"] for r in at), default=None)
    speedup = min((r["attn_speedup"] for r in at_budget), default=None)
    with_selection = min((r["step_speedup"] for r in at_budget), default=None)
    return {
        "selection_share": {
            "context": context,
            "target": f"<= {TARGET_SHARE}",
            "max": share,
            "holds": share is not None and share <= TARGET_SHARE,
            "per_config": {f"b{r['batch']}/budget{r['budget']}": r["select_share"] for r in at},
        },
        "attention_speedup": {
            "context": context,
            "budget": budget,
            "target": f">= {TARGET_SPEEDUP}x",
            "min": speedup,
            "holds": speedup is not None and speedup >= TARGET_SPEEDUP,
            "min_including_selection": with_selection,
            "per_batch": {r["batch"]: r["attn_speedup"] for r in at_budget},
        },
    }


COLUMNS = [
    ("context", "context"),
    ("batch", "batch"),
    ("budget", "budget"),
    ("num_blocks", "blocks"),
    ("select_ms", "selection ms"),
    ("sparse_ms", "sparse attn ms"),
    ("full_ms", "full decode ms"),
    ("select_share", "selection share"),
    ("attn_speedup", "full / sparse"),
    ("step_speedup", "full / (sel + sparse)"),
    ("timing", "timing"),
]


def g3(v) -> str:
    return "-" if v is None else f"{v:.3g}"


def report(result: dict) -> str:
    shapes = result["shapes"]
    title = "tiny smoke shapes" if result["smoke"] else "Llama-3.1-8B shapes"
    lines = [
        f"## One attention layer, {title} ({shapes['num_heads']} q heads, {shapes['num_kv_heads']} KV heads, "
        f"d {shapes['head_dim']}, {result['dtype'].removeprefix('torch.')})",
        "",
        markdown(result["rows"], COLUMNS),
        "",
    ]
    eager = [{**r, **{k: r["eager"][k] for k in ("select_ms", "sparse_ms", "full_ms")}} for r in result["rows"]]
    lines += ["Eager (Python launch overhead included):", "", markdown(eager, COLUMNS[:7]), ""]
    for s in result["skipped"]:
        lines.append(f"skipped: context {s['context']} batch {s['batch']}: {s['reason']}")
    for s in result["failed"]:
        lines.append(f"FAILED: context {s['context']} batch {s['batch']}: {s['error']}")
    tc = result.get("tensor_cores")
    if tc and "error" in tc:
        lines += ["", f"use_tensor_cores comparison failed: {tc['error']}"]
    elif tc:

        def ms(t):
            return f"{t['graph_ms'] if t['graph_ms'] is not None else t['eager_ms']:.3f}"

        lines += [
            "",
            f"use_tensor_cores at context {tc['context']}, batch {tc['batch']}, budget {tc['budget']} "
            f"(SGLang's rule picks {'on' if tc['sglang_rule'] else 'off'}): folded sparse off {ms(tc['sparse_off'])} "
            f"/ on {ms(tc['sparse_on'])} ms; full off {ms(tc['full_off'])} / on {ms(tc['full_on'])} ms",
        ]
    t = result.get("targets")
    if t:
        s, a = t["selection_share"], t["attention_speedup"]
        lines += [
            "",
            f"target: selection <= {TARGET_SHARE:.0%} of the sparse step at context {s['context']}: "
            f"{'holds' if s['holds'] else 'MISSED'} (max share {g3(s['max'])})",
            f"target: attention >= {TARGET_SPEEDUP}x faster than full at context {a['context']}, budget "
            f"{a['budget']}: {'holds' if a['holds'] else 'MISSED'} (min x{g3(a['min'])}; with selection "
            f"x{g3(a['min_including_selection'])})",
        ]
    lines += ["", *footer(result)]
    return "\n".join(lines)


def main(argv=None):
    argv, args, env, shapes, path = start(argv, parse_args, "gpu_kernels.json")
    result = {
        **header("benchmarks.gpu.kernels", argv, env),
        "shapes": {k: shapes[k] for k in ("num_heads", "num_kv_heads", "head_dim")},
        "dtype": str(env.dtype),
        "layout": {
            "block_tokens": [BLOCK_MIN, BLOCK_MAX],
            "keep_head": KEEP_HEAD,
            "recent": RECENT,
            "slots": "contiguous per request",
            "kv": "one layer, random normal",
        },
        "timing": {
            "warmup": args.warmup,
            "reps": args.reps,
            "statistic": "median",
            "clock": "CUDA events" if env.cuda else "perf_counter",
        },
        "compile_s": {},
        "rows": [],
        "skipped": [],
        "failed": [],
        "tensor_cores": None,
        "targets": None,
        "partial": True,
    }
    log(f"gpu kernels benchmark -> {path}\nwarm-up (first calls compile):")
    result["compile_s"] = warm_up(env, shapes)
    write_json(path, result)
    # use_tensor_cores on/off is compared once: longest context, batch 8 (or the smallest), largest budget.
    tc_config = (max(args.contexts), 8 if 8 in args.batches else min(args.batches), max(args.budgets))
    for context in args.contexts:
        for batch in args.batches:
            need = config_bytes(shapes, batch, context, args.budgets, GiB if env.cuda else 0)
            free = env.free_bytes()
            if need > free:
                reason = f"needs ~{need / GiB:.1f} GiB, {free / GiB:.1f} GiB free"
                result["skipped"].append({"context": context, "batch": batch, "reason": reason})
                log(f"context {context} batch {batch}: skipped ({reason})")
                continue
            log(f"context {context} batch {batch}:")
            tc_budget = tc_config[2] if (context, batch) == tc_config[:2] else None
            try:
                rows, tc = run_config(env, shapes, batch, context, args, tc_budget)
                result["rows"] += rows
                result["tensor_cores"] = tc or result["tensor_cores"]
            except Exception as e:  # noqa: BLE001 - one config must not cost the others (GPU run)
                if args.smoke:
                    raise
                result["failed"].append({"context": context, "batch": batch, "error": short_error(e)})
                log(f"  FAILED: {short_error(e)}")
            gc.collect()
            write_json(path, result)
    target_budget = TARGET_BUDGET if TARGET_BUDGET in args.budgets else max(args.budgets)
    result["targets"] = targets(result["rows"], max(args.contexts), target_budget)
    result["partial"] = False
    write_json(path, result)
    print("\n" + report(result))
    return result


if __name__ == "__main__":
    main()
