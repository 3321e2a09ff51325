"""A Llama-3.1-8B-shaped decode step over 32 layers: DynSplit-KV against full attention.

    python -m benchmarks.gpu.decode_step                        # H100: 32k x batch 8, 128k x the largest batch
    python -m benchmarks.gpu.decode_step --smoke --out /tmp/d.json   # tiny shapes on the CPU (CI)

Not a served model: random bf16 weights of ONE layer are reused by all 32 layers (the same GEMM
shapes and bytes read per layer, 1/32 of the weight memory), RMSNorm, RoPE and SiLU in torch, no
sampling. Per layer: RMSNorm, QKV GEMM (4096 -> 4096+1024+1024), RoPE, the new token's K/V
written into that layer's own KV pool, attention, O GEMM, RMSNorm, gate/up GEMM (-> 2 x 14336),
SiLU-and-mul, down GEMM; then the final norm and the LM head (4096 -> 128256). Attention:
  full      FlashInfer's decode over every slot of every request (SGLang's `--kv full` plan)
  dynsplit  per layer `select_slots` (Triton) + `FoldedSparseDecode.write_indices` + `run`,
            one plan per step; the block layout is the synthetic one of benchmarks.gpu.kernels
Both keep the same KV resident (DynSplit-KV does not evict); dynsplit also keeps the block
records (1/16 of the KV at 16-token blocks). Each step is timed eagerly, as a replay of the
whole 32-layer step captured in a CUDA graph, and as a breakable graph (every layer's GEMMs,
norms, RoPE and KV write captured in segments, the attention run eagerly between them: what
`--attention-backend dynsplit_flashinfer --cuda-graph-backend-decode breakable` does in a server,
minus the policy's Python), with the per-step plan (host) before each.

Writes benchmarks/results/gpu_decode_step.json (or --out) after every setting, prints a table.
"""

from __future__ import annotations

import argparse
import gc

import torch
import torch.nn.functional as F

from benchmarks.gpu.common import (
    BreakableGraph,
    GiB,
    capture,
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
from benchmarks.gpu.kernels import warm_up
from dynsplit_sglang.sparse_decode_flashinfer import FoldedSparseDecode

# (context, batch); batch None = the largest batch whose KV (and dynsplit's records) fits.
GPU_SETTINGS = [(32768, 8), (131072, None)]
SMOKE_SETTINGS = [(96, 2), (160, None)]  # smoke budgets >= sink + recent + open block (~56)
TARGET_SPEEDUP = 2.2  # dynsplit vs full at the longest context, largest batch
RESERVE = 3 * GiB  # kept free beside the KV: activations, graph pools, scratch, cuBLAS/FlashInfer workspaces


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, torch stand-ins (CI check)")
    p.add_argument(
        "--out", help="JSON path (default benchmarks/results/gpu_decode_step.json; a temp file with --smoke)"
    )
    p.add_argument("--budgets", type=int, nargs="+")
    p.add_argument("--max-batch", type=int, help="cap on the computed largest batch (default 64; 3 with --smoke)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=10)
    args = p.parse_args(argv)
    if args.budgets is None:
        args.budgets = [56, 64] if args.smoke else [2048, 4096]
    if args.max_batch is None:
        args.max_batch = 3 if args.smoke else 64
    if args.smoke:
        args.warmup, args.reps = 1, 2
    return args


# --- the model ---------------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """x [B, hidden] -> same shape, normalised in fp32 as Llama does."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Neox-style rotary embedding. x [B, heads, D]; cos, sin [B, 1, D]. Returns a contiguous tensor."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), -1)
    return x * cos + rotated * sin


class Model:
    """One decoder layer's weights, reused by every layer, and the LM head. Weights [out, in]."""

    def __init__(self, env, shapes, seed: int = 0):
        torch.manual_seed(seed)
        self.shapes = shapes
        h, kvh, d, hidden, inter = (
            shapes[k] for k in ("num_heads", "num_kv_heads", "head_dim", "hidden", "intermediate")
        )

        def weight(out_features, in_features):
            # 1/sqrt(fan_in) keeps activations O(1) over 32 residual layers (no inf/nan in bf16).
            w = torch.empty(out_features, in_features, dtype=env.dtype, device=env.device).normal_()
            return w.mul_(in_features**-0.5)

        self.qkv = weight((h + 2 * kvh) * d, hidden)
        self.o = weight(hidden, h * d)
        self.gate_up = weight(2 * inter, hidden)
        self.down = weight(hidden, inter)
        self.lm_head = weight(shapes["vocab"], hidden)
        self.norm = torch.ones(hidden, dtype=env.dtype, device=env.device)

    @property
    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qkv, self.o, self.gate_up, self.down, self.lm_head))

    def step(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache, attention) -> torch.Tensor:
        """One decode step. x [B, hidden] (the new tokens' embeddings); cos, sin [B, 1, D] at their
        positions; attention(layer, q [B, H, D]) -> [B, H, D]. Returns logits [B, vocab]."""
        s = self.shapes
        batch, h, kvh, d, inter = x.shape[0], s["num_heads"], s["num_kv_heads"], s["head_dim"], s["intermediate"]
        for layer in range(s["layers"]):
            q, k, v = (rms_norm(x, self.norm) @ self.qkv.T).split([h * d, kvh * d, kvh * d], -1)
            q = rope(q.view(batch, h, d), cos, sin)
            cache.store(layer, rope(k.view(batch, kvh, d), cos, sin), v.view(batch, kvh, d))
            x = x + attention(layer, q).reshape(batch, h * d) @ self.o.T
            gate, up = (rms_norm(x, self.norm) @ self.gate_up.T).split([inter, inter], -1)
            x = x + (F.silu(gate) * up) @ self.down.T
        return rms_norm(x, self.norm) @ self.lm_head.T


def rotary(positions: torch.Tensor, head_dim: int, dtype, theta: float = 500000.0):
    """cos, sin [B, 1, D] for the given positions [B] (Llama-3's base; no long-context scaling)."""
    inv = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=positions.device) / head_dim)
    angles = positions.double()[:, None] * inv[None, :]
    angles = torch.cat((angles, angles), -1)[:, None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


class KVCache:
    """Per-layer K and V pools [num_slots, KvH, D] (SGLang's layout) and per-layer block records
    kmin, kmax [layers, capacity, KvH, D]; the new token of request b goes to the slot of its
    last position (inside the kept tail, so both policies attend to it)."""

    def __init__(self, env, shapes, layout):
        kvh, d, layers = shapes["num_kv_heads"], shapes["head_dim"], shapes["layers"]
        shape = (layout.num_slots, kvh, d)
        self.k = [torch.empty(shape, dtype=env.dtype, device=env.device).normal_() for _ in range(layers)]
        self.v = [torch.empty(shape, dtype=env.dtype, device=env.device).normal_() for _ in range(layers)]
        self.kmin, self.kmax = random_bounds(layout.capacity, kvh, d, env.dtype, env.device, layers=layers)
        self.new_slots = layout.req_slots[:, -1].contiguous()  # [B]
        self.pages = [(k.view(-1, 1, kvh, d), v.view(-1, 1, kvh, d)) for k, v in zip(self.k, self.v)]

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [B, KvH, D] of the new tokens into this layer's pool (fixed slots: graph-safe)."""
        self.k[layer][self.new_slots] = k
        self.v[layer][self.new_slots] = v


class FullAttention:
    """FlashInfer decode over every KV slot (CUDA-graph-mode wrapper), planned once per step."""

    def __init__(self, env, shapes, layout, cache):
        self.cache = cache
        tc = use_tensor_cores(shapes["num_heads"], shapes["num_kv_heads"])
        self.wrapper, self.plan = full_decode_plan(
            env, layout, shapes["num_heads"], shapes["num_kv_heads"], shapes["head_dim"], tc
        )

    def __call__(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        return self.wrapper.run(q, self.cache.pages[layer])


class DynSplitAttention:
    """Per layer: selection into fixed [B, KvH, budget] buffers, index write, folded sparse decode."""

    def __init__(self, env, shapes, layout, cache, budget: int):
        self.env, self.cache = env, cache
        h, kvh, d = shapes["num_heads"], shapes["num_kv_heads"], shapes["head_dim"]
        self.inputs = layout.select_inputs(budget)
        self.slots = torch.zeros(layout.batch, kvh, budget, dtype=torch.int64, device=env.device)
        self.counts = torch.zeros(layout.batch, kvh, dtype=torch.int32, device=env.device)
        self.sparse = FoldedSparseDecode(
            env.sparse_wrapper_factory(use_tensor_cores(h, kvh)),
            kvh,
            h // kvh,
            d,
            max_requests=layout.batch,
            max_out=budget,
            device=env.device,
        )
        self.expected = min(budget, layout.context)  # the budget is filled exactly
        self.plan = lambda: self.sparse.plan([self.expected] * layout.batch, budget, env.dtype, env.dtype, d**-0.5)
        self.plan()

    def counts_ok(self) -> bool:
        """Did the last layer's selection keep exactly the planned number of slots per row?"""
        return bool((self.counts == self.expected).all())

    def __call__(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        self.env.select(
            q,
            self.cache.kmin[layer],
            self.cache.kmax[layer],
            **self.inputs,
            slots_out=self.slots,
            counts_out=self.counts,
        )
        self.sparse.write_indices(self.slots)
        return self.sparse.run(q, self.cache.k[layer], self.cache.v[layer])[0]


# --- measuring -------------------------------------------------------------------------------


def batch_sizes(env, shapes, model, context: int, max_batch: int) -> dict:
    """The largest batch whose KV fits beside what is allocated (full), and whose KV + records fit
    (both policies share the KV in this process, dynsplit adds its records); also what full
    would fit with the real model's weights resident instead of one layer's."""
    layers, kvh, d = shapes["layers"], shapes["num_kv_heads"], shapes["head_dim"]
    itemsize = torch.empty(0, dtype=env.dtype).element_size()
    per_kv = kv_bytes(context, layers, kvh, d, itemsize)
    per_records = record_bytes(expected_blocks(context), layers, kvh, d, itemsize)
    free = env.free_bytes()
    avail = free - (RESERVE if env.cuda else 0)
    real_extra = int(shapes["params"] * itemsize) - model.weight_bytes
    return {
        "free_bytes": free,
        "reserve_bytes": RESERVE if env.cuda else 0,
        "kv_bytes_per_request": per_kv,
        "record_bytes_per_request": per_records,
        "full_fits": max(avail // per_kv, 0),
        "both_fit": max(avail // (per_kv + per_records), 0),
        "full_fits_with_real_weights": max((avail - real_extra) // per_kv, 0) if shapes["params"] else None,
        "max_batch": max_batch,
    }


def time_policy(env, model, x, cos, sin, cache, policy, args) -> dict:
    """Eager, CUDA-graph and breakable-graph step times (ms, median) with the plan before each step."""

    def eager_step():
        policy.plan()
        return model.step(x, cos, sin, cache, policy)

    logits = eager_step()
    result = {
        "finite_logits": bool(torch.isfinite(logits).all()),
        "counts_ok": policy.counts_ok() if hasattr(policy, "counts_ok") else None,
        "eager_ms": median_ms(env, eager_step, args.warmup, args.reps),
        "plan_ms": host_ms(env, policy.plan, 3),
        "graph_ms": None,
        "graph_error": None,
        "breakable_ms": None,
        "breakable_error": None,
    }
    if not env.cuda:
        result["graph_error"] = result["breakable_error"] = "no CUDA (smoke run)"
        return result

    def whole_graph():  # the 32 layers' kernels in one graph
        return capture(lambda: model.step(x, cos, sin, cache, policy)).replay

    def breakable_graph():  # every layer's attention eager between captured segments
        graph = BreakableGraph()
        graph.capture(lambda: model.step(x, cos, sin, cache, lambda layer, q: graph.eager(policy, layer, q)))
        return graph.replay

    for kind, captured in (("graph", whole_graph), ("breakable", breakable_graph)):
        try:
            replay = captured()

            def step(replay=replay):  # the plan stays outside the graph (host work)
                policy.plan()
                replay()

            result[f"{kind}_ms"] = median_ms(env, step, args.warmup, args.reps)
            del replay
        except Exception as e:  # noqa: BLE001 - report it, the other numbers stand
            result[f"{kind}_error"] = short_error(e)
            torch.cuda.synchronize()
    return result


def run_setting(env, shapes, model, context: int, batch: int, args) -> list[dict]:
    """full and dynsplit at every budget on one shared KV; one row per policy."""
    layout = make_layout(batch, context, env.device)
    cache = KVCache(env, shapes, layout)
    x = torch.randn(batch, shapes["hidden"], dtype=env.dtype, device=env.device)
    cos, sin = rotary(layout.seq_lens - 1, shapes["head_dim"], env.dtype)
    layers, kvh, d = shapes["layers"], shapes["num_kv_heads"], shapes["head_dim"]
    itemsize = x.element_size()
    kv_resident = kv_bytes(layout.num_slots, layers, kvh, d, itemsize)
    records_resident = record_bytes(layout.capacity, layers, kvh, d, itemsize)
    policies = [("full", None, lambda: FullAttention(env, shapes, layout, cache))]
    policies += [("dynsplit", b, lambda b=b: DynSplitAttention(env, shapes, layout, cache, b)) for b in args.budgets]
    rows = []
    for name, budget, make in policies:
        policy = make()
        timing = time_policy(env, model, x, cos, sin, cache, policy, args)
        del policy
        attended = context if budget is None else min(budget, context)
        rows.append(
            {
                "context": context,
                "batch": batch,
                "policy": name,
                "budget": budget,
                **timing,
                "kv_resident_bytes": kv_resident,
                "records_resident_bytes": records_resident if budget else 0,
                "kv_read_bytes": kv_bytes(batch * attended, layers, kvh, d, itemsize),
                "records_read_bytes": record_bytes(layout.capacity, layers, kvh, d, itemsize) if budget else 0,
                "num_blocks": layout.num_blocks,
            }
        )
        log(progress_line(rows[-1], env.cuda))
    full = rows[0]
    for r in rows:
        r["step_ms"] = r["graph_ms"] if r["graph_ms"] is not None else r["eager_ms"]
        r["timing"] = "graph" if r["graph_ms"] is not None else "eager"
        r["tokens_per_s"] = batch / r["step_ms"] * 1000
        r["speedup_eager"] = full["eager_ms"] / r["eager_ms"]
        both_graph = r["graph_ms"] is not None and full["graph_ms"] is not None
        r["speedup_graph"] = full["graph_ms"] / r["graph_ms"] if both_graph else None
        r["speedup"] = r["speedup_graph"] if both_graph else r["speedup_eager"]
    return rows


def progress_line(r: dict, cuda: bool) -> str:
    label = r["policy"] if r["budget"] is None else f"{r['policy']} budget {r['budget']}"
    graph = "-" if r["graph_ms"] is None else f"{r['graph_ms']:.2f} ms"
    notes = ("" if r["finite_logits"] else ", NON-FINITE logits") + (
        ", WRONG counts" if r["counts_ok"] is False else ""
    )
    notes += ", graph failed" if r["graph_error"] and cuda else ""
    notes += ", breakable graph failed" if r["breakable_error"] and cuda else ""
    breakable = "-" if r["breakable_ms"] is None else f"{r['breakable_ms']:.2f} ms"
    return (
        f"  {label}: eager {r['eager_ms']:.2f} ms, graph {graph}, breakable {breakable}, "
        f"plan {r['plan_ms']:.2f} ms{notes}"
    )


def targets(rows: list[dict], context: int) -> dict:
    at = [r for r in rows if r["context"] == context and r["policy"] == "dynsplit"]
    per_budget = {r["budget"]: r["speedup"] for r in at}
    return {
        "decode_step_speedup": {
            "context": context,
            "batch": at[0]["batch"] if at else None,
            "target": f">= {TARGET_SPEEDUP}x",
            "per_budget": per_budget,
            "timing": sorted({r["timing"] for r in at}),
            "holds": bool(per_budget) and all(v >= TARGET_SPEEDUP for v in per_budget.values()),
        }
    }


COLUMNS = [
    ("context", "context"),
    ("batch", "batch"),
    ("policy", "policy"),
    ("budget", "budget"),
    ("eager_ms", "eager ms"),
    ("graph_ms", "graph ms"),
    ("breakable_ms", "breakable graph ms"),
    ("plan_ms", "plan ms"),
    ("tokens_per_s", "tokens/s"),
    ("speedup", "speedup vs full"),
    ("kv_resident_GiB", "KV resident GiB"),
    ("records_resident_GiB", "records resident GiB"),
    ("kv_read_GiB", "KV read / step GiB"),
    ("records_read_GiB", "records read / step GiB"),
]


def report(result: dict) -> str:
    rows = [
        {
            **r,
            **{
                f"{k}_GiB": r[f"{k}_bytes"] / GiB
                for k in ("kv_resident", "records_resident", "kv_read", "records_read")
            },
        }
        for r in result["rows"]
    ]
    title = "tiny smoke shapes" if result["smoke"] else "Llama-3.1-8B shapes"
    lines = [
        f"## Decode step, {title} ({result['shapes']['layers']} layers; one layer's random weights reused by all)",
        "",
        markdown(rows, COLUMNS),
        "",
    ]
    for s in result["settings"]:
        lines.append(f"context {s['context']}: batch {s['batch']} ({s['why']})")
    for r in result["rows"]:
        for kind in ("graph", "breakable"):
            if r[f"{kind}_error"] and result["smoke"] is False:
                lines.append(
                    f"{kind} capture failed for {r['policy']} {r['budget']} at {r['context']}: {r[f'{kind}_error']}"
                )
    for f in result["failed"]:
        lines.append(f"FAILED: context {f['context']}: {f['error']}")
    t = result.get("targets", {}).get("decode_step_speedup")
    if t:
        lines.append(
            f"\ntarget: dynsplit >= {TARGET_SPEEDUP}x full at context {t['context']}, batch {t['batch']}: "
            f"{'holds' if t['holds'] else 'MISSED'} ("
            + ", ".join(f"budget {b}: x{v:.3g}" for b, v in t["per_budget"].items())
            + f"; {'/'.join(t['timing'])} timing)"
        )
    lines += ["", result["note"], *footer(result)]
    return "\n".join(lines)


def main(argv=None):
    argv, args, env, shapes, path = start(argv, parse_args, "gpu_decode_step.json")
    model = Model(env, shapes)
    result = {
        **header("benchmarks.gpu.decode_step", argv, env),
        "shapes": {k: v for k, v in shapes.items() if k != "params"},
        "dtype": str(env.dtype),
        "note": (
            "Model-shaped, not a served model: one layer's random weights are reused by all "
            f"{shapes['layers']} layers (same GEMM shapes and bytes per layer), plus the LM head; "
            f"weights resident {model.weight_bytes / GiB:.2f} GiB. Step time includes the per-step plan."
        ),
        "timing": {
            "warmup": args.warmup,
            "reps": args.reps,
            "statistic": "median",
            "clock": "CUDA events" if env.cuda else "perf_counter",
        },
        "budgets": args.budgets,
        "compile_s": {},
        "settings": [],
        "rows": [],
        "failed": [],
        "targets": {},
        "partial": True,
    }
    log(f"gpu decode step benchmark -> {path}\nwarm-up (first calls compile; cached after benchmarks.gpu.kernels):")
    result["compile_s"] = warm_up(env, shapes)
    settings = SMOKE_SETTINGS if args.smoke else GPU_SETTINGS
    for context, batch in settings:
        gc.collect()
        sizes = batch_sizes(env, shapes, model, context, args.max_batch)
        if batch is None:
            batch = min(sizes["both_fit"], args.max_batch)
            why = (
                f"the largest that fits: full's KV fits {sizes['full_fits']}, with dynsplit's records "
                f"{sizes['both_fit']}"
                + (f", capped at --max-batch {args.max_batch}" if batch == args.max_batch else "")
                + (
                    f"; with all of the real model's weights resident full would fit "
                    f"{sizes['full_fits_with_real_weights']}"
                    if sizes["full_fits_with_real_weights"] is not None
                    else ""
                )
            )
        else:
            why = "fixed"
        result["settings"].append({"context": context, "batch": batch, "why": why, **sizes})
        log(f"context {context} batch {batch} ({why}):")
        if batch < 1:
            result["failed"].append({"context": context, "error": "not even one request fits"})
            continue
        try:
            result["rows"] += run_setting(env, shapes, model, context, batch, args)
        except Exception as e:  # noqa: BLE001 - one setting must not cost the other (GPU run)
            if args.smoke:
                raise
            result["failed"].append({"context": context, "error": short_error(e)})
            log(f"  FAILED: {short_error(e)}")
        write_json(path, result)
    result["targets"] = targets(result["rows"], settings[-1][0])
    result["partial"] = False
    write_json(path, result)
    print("\n" + report(result))
    return result


if __name__ == "__main__":
    main()
