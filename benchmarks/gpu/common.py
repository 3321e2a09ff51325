"""What the two GPU benchmarks share: the device setup, the synthetic block layout, timers, output.

`Env` is everything that differs between the GPU run and the CPU `--smoke` run: the device and
dtype, the selection (`select_slots` in Triton, or its torch reference), the decode wrapper
(FlashInfer's, or the torch stand-in), the clock (CUDA events, or perf_counter) and the memory
that counts as free. The benchmark code above it is the same in both, so the smoke run checks it.
"""

from __future__ import annotations

import json
import os
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch

from benchmarks.common import RESULTS, run_info
from dynsplit_sglang.sparse_decode_flashinfer import flashinfer_wrapper

GiB = 1 << 30

# Llama-3.1-8B (what the issue measures) and a tiny stand-in of the same structure for --smoke.
LLAMA_8B = dict(
    num_heads=32, num_kv_heads=8, head_dim=128, hidden=4096, intermediate=14336, layers=32, vocab=128256, params=8.03e9
)
TINY = dict(num_heads=4, num_kv_heads=2, head_dim=16, hidden=64, intermediate=96, layers=2, vocab=97, params=0)

# The synthetic block layout: what the splitter makes with block_size 16, delta 4 (blocks end
# anywhere in C +- delta), plus DynSplitPolicy's always-kept sink and recent window.
BLOCK_MIN, BLOCK_MAX = 12, 20
KEEP_HEAD = 4
RECENT = 32


def use_tensor_cores(num_heads: int, num_kv_heads: int) -> bool:
    """SGLang 0.5.23's rule for FlashInfer decode (`should_use_tensor_core`, bf16/fp16 KV):
    tensor cores from a GQA group of 4 up. Llama-3.1-8B (group 4) gets them."""
    return num_heads // num_kv_heads >= 4


def load_flashinfer():
    """Import FlashInfer or stop with a message that names what is missing."""
    try:
        import flashinfer
    except ImportError as e:
        sys.exit(
            f"flashinfer is not importable ({type(e).__name__}: {e}).\n"
            "Install the carried wheel, e.g. `pip install --no-deps flashinfer_python-0.7.2.post1-py3-none-any.whl`,\n"
            "plus what its import and JIT need (apache-tvm-ffi, filelock, ninja; nvcc on PATH), or run with --smoke."
        )
    return flashinfer


@dataclass
class Env:
    device: torch.device
    dtype: torch.dtype
    smoke: bool
    select: object  # select_slots or select_slots_reference (same signature)
    flashinfer: object = None  # the module on the GPU, None in --smoke
    workspace: torch.Tensor | None = None  # FlashInfer's float workspace, shared by every wrapper
    smoke_free_bytes: int = 256 << 20  # what counts as free memory in --smoke

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def decode_wrapper(self, use_cuda_graph: bool, tensor_cores: bool, indptr=None, indices=None, last_page_len=None):
        """FlashInfer's BatchDecodeWithPagedKVCacheWrapper (fa2, NHD) or the stand-in; the three
        buffers are the ones it keeps in CUDA-graph mode (None otherwise)."""
        if self.smoke:
            from dynsplit_sglang.testing.fake_flashinfer import FakeDecodeWrapper

            return FakeDecodeWrapper(use_cuda_graph, indptr, indices, last_page_len, use_tensor_cores=tensor_cores)
        return self.flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace,
            "NHD",
            use_cuda_graph=use_cuda_graph,
            use_tensor_cores=tensor_cores,
            paged_kv_indptr_buffer=indptr,
            paged_kv_indices_buffer=indices,
            paged_kv_last_page_len_buffer=last_page_len,
            backend="fa2",
        )

    def sparse_wrapper_factory(self, tensor_cores: bool):
        """`make_wrapper` for FoldedSparseDecode: a CUDA-graph-mode wrapper on its own buffers
        (the project's `flashinfer_wrapper` on the GPU)."""
        if not self.smoke:
            return flashinfer_wrapper(self.workspace, use_cuda_graph=True, use_tensor_cores=tensor_cores)

        def make(sparse):
            return self.decode_wrapper(True, tensor_cores, sparse.indptr, sparse.indices, sparse.last_page_len)

        return make

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def free_bytes(self) -> int:
        """Free device memory now (after emptying the allocator's cache); a fixed amount in --smoke."""
        if not self.cuda:
            return self.smoke_free_bytes
        torch.cuda.empty_cache()
        return torch.cuda.mem_get_info()[0]


def make_env(smoke: bool) -> Env:
    """The GPU environment (needs CUDA and FlashInfer), or the CPU smoke one."""
    if smoke:
        from dynsplit_sglang.kernels.block_select_triton import select_slots_reference

        torch.set_num_threads(1)  # tiny shapes: more threads only contend with whatever else runs
        return Env(torch.device("cpu"), torch.float32, True, select_slots_reference)
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: run on the GPU box, or use --smoke for the CPU check")
    flashinfer = load_flashinfer()
    from dynsplit_sglang.kernels.block_select_triton import select_slots

    device = torch.device("cuda")
    # SGLang 0.5.23's default FlashInfer workspace (SGLANG_FLASHINFER_WORKSPACE_SIZE): 384 MiB.
    workspace = torch.zeros(384 << 20, dtype=torch.uint8, device=device)
    return Env(device, torch.bfloat16, False, select_slots, flashinfer, workspace)


def start(argv, parse_args, json_name: str):
    """A benchmark's start: (args, env, shapes, JSON path) from its command line (sys.argv if None)."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    env = make_env(args.smoke)
    return argv, args, env, TINY if args.smoke else LLAMA_8B, output_path(json_name, args.out, args.smoke)


def versions(env: Env) -> dict:
    import triton

    out = {
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "flashinfer": getattr(env.flashinfer, "__version__", None) if env.flashinfer else None,
        "gpu": torch.cuda.get_device_name(0) if env.cuda else None,
    }
    return out


def header(module: str, argv: list[str], env: Env) -> dict:
    """run_info() (commit, device, date) with this benchmark's exact command and the versions.

    DYNSPLIT_COMMIT overrides the commit where the tree was copied without its .git (the GPU box)."""
    info = run_info()
    info["command"] = " ".join(shlex.quote(a) for a in ["python", "-m", module, *argv])
    if os.environ.get("DYNSPLIT_COMMIT") and info["commit"] == "unknown":
        info["commit"] = os.environ["DYNSPLIT_COMMIT"]
    return {**info, **versions(env), "smoke": env.smoke}


def output_path(name: str, out: str | None, smoke: bool) -> str:
    """Where the JSON goes: --out, else benchmarks/results/NAME (a temp file for --smoke, which
    must never touch the recorded results)."""
    if out is None:
        if smoke:
            import tempfile

            return os.path.join(tempfile.gettempdir(), name.replace(".json", ".smoke.json"))
        return os.path.join(RESULTS, name)
    if smoke and os.path.abspath(out).startswith(os.path.abspath(RESULTS) + os.sep):
        sys.exit(f"--smoke does not write into {RESULTS}: pick another --out")
    return out


def write_json(path: str, result: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, path)  # a reader (or a timeout) never sees half a file


def markdown(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A markdown table: columns are (key, title); floats with 3 significant digits, None as -."""

    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, bool):
            return "yes" if v else "no"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(t for _, t in columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join(lines)


def footer(result: dict) -> list[str]:
    """A report's last lines: the first calls' compile seconds, then device, versions, commit,
    date and the exact command."""
    compile_s = ", ".join(
        f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in result["compile_s"].items()
    )
    return [
        f"first calls (compile), s: {compile_s}",
        f"{result['device']}; torch {result['torch']}, triton {result['triton']}, flashinfer "
        f"{result['flashinfer']}; commit {result['commit']}; {result['date']}; `{result['command']}`",
    ]


def log(msg: str) -> None:
    print(msg, flush=True)


# --- timing ------------------------------------------------------------------------------------


def median_ms(env: Env, fn, warmup: int, reps: int) -> float:
    """Median wall time of fn() in ms over reps calls after warmup: CUDA events around each call
    on the GPU (so launch overhead the GPU waits for counts), perf_counter on the CPU."""
    for _ in range(warmup):
        fn()
    times = []
    if env.cuda:
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        torch.cuda.synchronize()
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        times = [start.elapsed_time(end) for start, end in events]
    else:
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times)


def host_ms(env: Env, fn, reps: int) -> float:
    """Median host time of fn() in ms, device synced after each call (for plans: host work + copies)."""
    times = []
    for _ in range(reps):
        env.sync()
        t = time.perf_counter()
        fn()
        env.sync()
        times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times)


def capture(fn, warmup: int = 2) -> torch.cuda.CUDAGraph:
    """fn() captured in a CUDA graph, after warmup calls on a side stream (lazy init of cuBLAS,
    Triton and FlashInfer happens outside the capture). Replays re-run fn's kernels on the
    same buffers: inputs are updated in place, outputs are the tensors fn made while captured."""
    warm_up_on_side_stream(fn, warmup)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph


def warm_up_on_side_stream(fn, warmup: int) -> torch.cuda.Stream:
    """Call fn() `warmup` times on a new side stream (lazy initialisations stay out of a
    capture), then wait for it; returns the stream."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    return stream


class BreakableGraph:
    """A function captured as CUDA-graph segments split at `eager(f, *args)` calls, which run
    eagerly between the segments at every replay: the shape of SGLang's breakable CUDA graphs,
    where `--attention-backend dynsplit_flashinfer` runs each layer's attention as such a break.
    A break's arguments keep their capture-time tensors (segment outputs, refreshed by each
    replay); what it returns at a replay is copied into the tensor it returned at capture, which
    the next segment reads."""

    def __init__(self):
        self.segments: list[torch.cuda.CUDAGraph] = []
        self.breaks: list[tuple] = []
        self._capturing = False
        self._pool = None
        self._graph = None

    def eager(self, f, *args):
        if not self._capturing:
            return f(*args)
        self._end_segment()
        out = f(*args)  # outside any capture: runs now, and its output is the bridge buffer
        self.breaks.append((f, args, out))
        self._begin_segment()
        return out

    def capture(self, fn, warmup: int = 2):
        """Capture fn() (after warmup calls on a side stream); returns what the captured call
        returned, which every replay overwrites."""
        stream = warm_up_on_side_stream(fn, warmup)
        self._pool = torch.cuda.graph_pool_handle()
        with torch.cuda.stream(stream):
            self._capturing = True
            try:
                self._begin_segment()
                result = fn()
                self._end_segment()
            finally:
                self._capturing = False
        torch.cuda.synchronize()
        return result

    def replay(self) -> None:
        for i, segment in enumerate(self.segments):
            segment.replay()
            if i < len(self.breaks):
                f, args, out = self.breaks[i]
                out.copy_(f(*args))

    def _begin_segment(self) -> None:
        self._graph = torch.cuda.CUDAGraph()
        self._graph.capture_begin(pool=self._pool)

    def _end_segment(self) -> None:
        self._graph.capture_end()
        self.segments.append(self._graph)


def short_error(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    return text if len(text) <= 600 else text[:600] + " ..."


# --- the synthetic block layout ------------------------------------------------------------------


@dataclass
class Layout:
    """A batch of equal-length sequences tiled by closed blocks, as `select_slots` takes them.

    records [B, NB] int64 (-1 after a request's last block); rec_start, rec_end [capacity] int64;
    req_slots [B, L] int64 (slots 1 + b*L + position: contiguous per request, slot 0 is SGLang's
    padding slot); seq_lens, keep_head, keep_tail_from [B] int64. num_slots = 1 + B*L.
    """

    batch: int
    context: int
    records: torch.Tensor
    rec_start: torch.Tensor
    rec_end: torch.Tensor
    req_slots: torch.Tensor
    seq_lens: torch.Tensor
    keep_head: torch.Tensor
    keep_tail_from: torch.Tensor
    stats: dict = field(default_factory=dict)

    @property
    def num_slots(self) -> int:
        return 1 + self.batch * self.context

    @property
    def capacity(self) -> int:
        return self.rec_start.numel()

    @property
    def num_blocks(self) -> int:
        return self.records.shape[1]

    def select_inputs(self, budget: int) -> dict:
        """The index arguments of select_slots (everything but q, kmin, kmax and the outputs)."""
        return dict(
            records=self.records,
            rec_start=self.rec_start,
            rec_end=self.rec_end,
            req_slots=self.req_slots,
            seq_lens=self.seq_lens,
            keep_head=self.keep_head,
            keep_tail_from=self.keep_tail_from,
            budgets=torch.full_like(self.seq_lens, budget),
        )


def expected_blocks(context: int) -> int:
    """Upper estimate of closed blocks per request (mean length 16, +2% and a few for the spread)."""
    return int(context / ((BLOCK_MIN + BLOCK_MAX) / 2) * 1.02) + 8


def make_layout(batch: int, context: int, device, seed: int = 0) -> Layout:
    """Blocks of BLOCK_MIN..BLOCK_MAX tokens (uniform, mean 16) tile each sequence of `context`
    tokens from position 0; the open block is what is left (at least one token). keep_head 4
    (the sink), keep_tail_from = max(0, min(open block start, seq_len - 32)) as DynSplitPolicy."""
    g = torch.Generator().manual_seed(seed)
    draws = context // BLOCK_MIN + 2
    lengths = torch.randint(BLOCK_MIN, BLOCK_MAX + 1, (batch, draws), generator=g)
    ends = torch.cumsum(lengths, 1)  # exclusive end of each drawn block
    closed = ends <= context - 1  # a block is closed if it leaves at least one token open after it
    per_request = closed.sum(1)  # [B]; closed blocks are a prefix of the draws
    nb = int(per_request.max())
    starts = ends - lengths
    # The open block starts where the last closed one ends (at 0 without a closed block).
    open_start = torch.where(per_request > 0, ends.gather(1, (per_request - 1).clamp_min(0)[:, None])[:, 0], 0)
    # Record ids: request b's blocks are records offset[b] .. offset[b] + n_b - 1.
    offsets = torch.cumsum(per_request, 0) - per_request
    j = torch.arange(nb)
    live = j[None, :] < per_request[:, None]
    records = torch.where(live, offsets[:, None] + j[None, :], -1)
    rec_start = starts[:, :nb][live]  # row-major order = record id order
    rec_end = ends[:, :nb][live] - 1
    seq_lens = torch.full((batch,), context, dtype=torch.int64)
    keep_tail_from = torch.clamp(torch.minimum(open_start, seq_lens - RECENT), min=0)
    req_slots = 1 + torch.arange(batch * context, dtype=torch.int64).view(batch, context)
    stats = {
        "num_blocks_max": nb,
        "num_blocks_mean": float(per_request.float().mean()),
        "mean_block_tokens": float((rec_end - rec_start + 1).float().mean()) if rec_start.numel() else None,
        "open_tail_tokens_mean": float((context - open_start).float().mean()),
    }
    to = lambda t: t.to(device)  # noqa: E731
    return Layout(
        batch,
        context,
        to(records),
        to(rec_start),
        to(rec_end),
        to(req_slots),
        to(seq_lens),
        to(torch.full((batch,), KEEP_HEAD, dtype=torch.int64)),
        to(keep_tail_from),
        stats,
    )


def random_bounds(capacity: int, num_kv_heads: int, head_dim: int, dtype, device, layers: int | None = None):
    """Random block key bounds kmin <= kmax, [capacity, KvH, D] (or [layers, capacity, KvH, D])."""
    shape = (capacity, num_kv_heads, head_dim) if layers is None else (layers, capacity, num_kv_heads, head_dim)
    kmin = torch.empty(shape, dtype=dtype, device=device).normal_()
    kmax = torch.empty(shape, dtype=dtype, device=device).uniform_(0, 1).add_(kmin)  # in place: no third copy
    return kmin, kmax


def kv_bytes(tokens: int, layers: int, num_kv_heads: int, head_dim: int, dtype_bytes: int = 2) -> int:
    """Bytes of K and V for `tokens` tokens over `layers` layers."""
    return 2 * tokens * layers * num_kv_heads * head_dim * dtype_bytes


def record_bytes(blocks: int, layers: int, num_kv_heads: int, head_dim: int, dtype_bytes: int = 2) -> int:
    """Bytes of the kmin/kmax block records: the same per block as K and V per token."""
    return kv_bytes(blocks, layers, num_kv_heads, head_dim, dtype_bytes)


def full_decode_plan(env: Env, layout: Layout, num_heads: int, num_kv_heads: int, head_dim: int, tensor_cores: bool):
    """A CUDA-graph-mode FlashInfer decode wrapper over every slot of every request (what SGLang
    plans for `--kv full`: page size 1, indptr from the sequence lengths, indices = req_to_token rows),
    planned. returns (wrapper, plan function)."""
    batch, context = layout.batch, layout.context
    indptr_buf = torch.zeros(batch + 1, dtype=torch.int32, device=env.device)
    indices_buf = torch.zeros(batch * context, dtype=torch.int32, device=env.device)
    last_buf = torch.ones(batch, dtype=torch.int32, device=env.device)
    wrapper = env.decode_wrapper(True, tensor_cores, indptr_buf, indices_buf, last_buf)
    # Host indptr and last_page_len: FlashInfer plans from host copies, so device ones cost a sync.
    indptr = torch.arange(batch + 1, dtype=torch.int32) * context
    indices = layout.req_slots.reshape(-1).to(torch.int32)
    last = torch.ones(batch, dtype=torch.int32)

    def plan():
        wrapper.plan(
            indptr,
            indices,
            last,
            num_heads,
            num_kv_heads,
            head_dim,
            1,
            pos_encoding_mode="NONE",
            q_data_type=env.dtype,
            kv_data_type=env.dtype,
            sm_scale=head_dim**-0.5,
        )

    plan()
    return wrapper, plan


def check_attention(
    out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, scale: float
) -> dict:
    """Compare one request's attention output with fp32 torch.

    out, q: [H, D]; k, v: [num_slots, KvH, D]; slots: [KvH, n] the slots each KV head attended.
    Random keys make the attention nearly uniform, so outputs are averages of thousands of values
    and small: the error is judged against the largest reference value. A wrong slot set gives a
    relative error of order 1; bf16 rounding stays near 1%. ok: relative error <= 5%."""
    num_kv_heads = slots.shape[0]
    group = q.shape[0] // num_kv_heads
    err, scale_ref = 0.0, 0.0
    for h in range(num_kv_heads):  # one KV head at a time: a 128k gather in fp32 is 64 MiB
        kh, vh = k[slots[h], h].float(), v[slots[h], h].float()
        heads = slice(h * group, (h + 1) * group)
        ref = torch.softmax(q[heads].float() @ kh.T * scale, -1) @ vh
        err = max(err, float((out[heads].float() - ref).abs().max()))
        scale_ref = max(scale_ref, float(ref.abs().max()))
    rel = err / max(scale_ref, 1e-30)
    return {"max_abs_err": err, "rel_err": rel, "ok": rel <= 0.05}
