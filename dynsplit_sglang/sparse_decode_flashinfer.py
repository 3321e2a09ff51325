"""Decode attention over the KV slots a policy selected, per KV head, with FlashInfer (GPU).

FlashInfer's paged decode takes one page list per batch row and shares it between the query
heads of a KV head. To give every KV head its own list, the KV heads are folded into the batch:

    rows:        request b, KV head h  ->  row b * KvH + h, with the G = H / KvH query heads of h
    KV cache:    SGLang's pool [num_slots, KvH, D] (page size 1)  ->  [num_slots * KvH, 1, 1, D]
                 pages, a view, no copy: page slot * KvH + h holds the key of (slot, h)
    plan:        num_qo_heads = G, num_kv_heads = 1, page_size = 1, last_page_len = 1

Because block selection fills the budget (`kernels/block_select.py`), every row of a request
attends to count_b = min(budget_b, seq_len_b) slots at every layer of a step (and head + tail
when they alone exceed a budget, which config validation rules out). The counts are known on
the host before the step, so indptr is too: one `plan` per step serves all layers, and each
layer only rewrites the index list in place, with fixed shapes, which a CUDA graph can replay.

Per step (host):   `plan(counts, width, ...)`     indptr from the counts, the scatter map, plan
Per layer (device): `write_indices(slots)`          selected slots [B, KvH, MAXB] -> folded list
                    `run(q, k_buffer, v_buffer)`    out [B, H, D], natural-log lse [B, H]

The wrapper is anything with FlashInfer's `BatchDecodeWithPagedKVCacheWrapper` plan/run
signature: FlashInfer's own (`flashinfer_wrapper`) on a GPU, a torch stand-in in the CPU tests.
"""

from __future__ import annotations

import math

import torch

from dynsplit_sglang.kernels.sparse_attention import sparse_decode_attention_batched

LN2 = math.log(2.0)


class FoldedSparseDecode:
    """Sparse decode for up to `max_requests` requests of up to `max_out` selected slots per KV head.

    Buffers (fixed size, so the wrapper may keep them in CUDA-graph mode):
      indptr        [max_requests * KvH + 1] int32   row offsets into indices
      indices       [max_requests * KvH * max_out + 1] int32   folded page ids; the last entry is
                    a dump for the padding of rows shorter than max_out
      last_page_len [max_requests * KvH] int32, all 1 (page size 1)
      dest          [max_requests * KvH * max_out] int64   where each (row, j) of the selection goes
    """

    def __init__(
        self, make_wrapper, num_kv_heads: int, group: int, head_dim: int, max_requests: int, max_out: int, device
    ):
        """make_wrapper(self) -> the decode wrapper (it may keep this object's buffers)."""
        self.num_kv_heads, self.group, self.head_dim = num_kv_heads, group, head_dim
        self.max_requests, self.max_out = max_requests, max_out
        rows = max_requests * num_kv_heads
        self.indptr = torch.zeros(rows + 1, dtype=torch.int32, device=device)
        self.indices = torch.zeros(rows * max_out + 1, dtype=torch.int32, device=device)
        self.last_page_len = torch.ones(rows, dtype=torch.int32, device=device)
        self.dest = torch.zeros(rows * max_out, dtype=torch.int64, device=device)
        # Folded id of (slot, head) = slot * KvH + head: the head part, for a [B, KvH, MAXB] selection.
        self._head = torch.arange(num_kv_heads, device=device).view(1, num_kv_heads, 1)
        self._batch = 0
        self._width = 0
        self.wrapper = make_wrapper(self)

    def plan(
        self, counts: list[int], width: int, q_dtype: torch.dtype, kv_dtype: torch.dtype, sm_scale: float, **plan_kwargs
    ) -> None:
        """Plan one decode step. counts: slots each request attends to (the same for its KV heads
        and for every layer); width: MAXB of the [B, KvH, MAXB] selections of this step (>= every
        count, <= max_out). No device sync: FlashInfer plans from host indptr, and the scatter
        map is built on the device from a small copy of it.

        A wrapper in CUDA-graph mode has a fixed batch and the captured index writes a fixed
        shape: make one of these per captured batch size and plan max_requests requests (pad
        with count 1) of width max_out."""
        batch = len(counts)
        if batch > self.max_requests or width > self.max_out:
            raise ValueError(
                f"sparse decode planned for {self.max_requests} requests of {self.max_out} slots, "
                f"got {batch} requests of {width}"
            )
        if getattr(self.wrapper, "is_cuda_graph_enabled", False) and (batch, width) != (
            self.max_requests,
            self.max_out,
        ):
            raise ValueError(
                f"a CUDA-graph sparse decode plans exactly {self.max_requests} requests of "
                f"{self.max_out} slots, got {batch} of {width}"
            )
        if any(c < 1 or c > width for c in counts):
            raise ValueError(f"every count must be in [1, {width}], got {counts}")
        rows = batch * self.num_kv_heads
        indptr = torch.zeros(rows + 1, dtype=torch.int32)
        indptr[1:] = torch.cumsum(torch.tensor(counts, dtype=torch.int32).repeat_interleave(self.num_kv_heads), 0)
        total = int(indptr[-1])
        # Entry j of row r goes to indptr[r] + j while j < count, else to the dump entry.
        self.indptr[: rows + 1].copy_(indptr, non_blocking=True)
        starts, ends = self.indptr[:rows, None].long(), self.indptr[1 : rows + 1, None].long()
        j = torch.arange(width, device=self.dest.device)[None, :]
        dump = self.indices.numel() - 1
        self.dest[: rows * width].view(rows, width).copy_(torch.where(starts + j < ends, starts + j, dump))
        self._batch, self._width = batch, width
        self.wrapper.plan(
            indptr,
            self.indices[:total],
            torch.ones(rows, dtype=torch.int32),
            self.group,
            1,
            self.head_dim,
            1,
            pos_encoding_mode="NONE",
            q_data_type=q_dtype,
            kv_data_type=kv_dtype,
            sm_scale=sm_scale,
            **plan_kwargs,
        )

    def write_indices(self, slots: torch.Tensor) -> None:
        """Put one layer's selection into the planned index list, in place (fixed shapes).

        slots: [B, KvH, width] int64 KV slots, the first count_b of each row valid (the rest is
        ignored), as `block_select_triton.select_slots` writes them.
        """
        batch, width = self._batch, self._width
        assert slots.shape == (batch, self.num_kv_heads, width), (slots.shape, batch, width)
        folded = (slots * self.num_kv_heads + self._head).view(-1).to(torch.int32)
        self.indices.index_copy_(0, self.dest[: folded.numel()], folded)

    def run(self, q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [B, H, D]; k_buffer, v_buffer: [num_slots, KvH, D] one layer of the KV pool.
        returns out [B, H, D] and the natural-log lse [B, H] fp32 of the attended logits."""
        batch = self._batch
        assert q.shape[0] == batch, (q.shape, batch)
        d = self.head_dim
        qf = q.reshape(batch * self.num_kv_heads, self.group, d)
        pages = (k_buffer.view(-1, 1, 1, d), v_buffer.view(-1, 1, 1, d))
        out, lse = self.wrapper.run(qf, pages, return_lse=True)
        # FlashInfer's lse is base 2 (max + log2 sum 2^x); the torch path and DD-Select use ln.
        return out.view(batch, -1, d), (lse.float() * LN2).view(batch, -1)


def flashinfer_wrapper(
    workspace: torch.Tensor, use_cuda_graph: bool, use_tensor_cores: bool = False, wrapper_class=None
):
    """`make_wrapper` for FlashInfer's decode wrapper (GPU only: imports flashinfer).

    In CUDA-graph mode the wrapper keeps the sparse decode's own indptr/indices buffers, so the
    per-layer index writes land where the captured kernels read; its batch is then fixed to the
    sparse decode's max_requests (FlashInfer takes it from the buffer sizes). fa2 explicitly: `auto` may pick
    a backend that copies the indices into a block table at plan time (later writes unseen).
    wrapper_class: FlashInfer's `BatchDecodeWithPagedKVCacheWrapper` unless given (a stand-in)."""
    if wrapper_class is None:
        import flashinfer

        wrapper_class = flashinfer.BatchDecodeWithPagedKVCacheWrapper

    def make(sparse: FoldedSparseDecode):
        return wrapper_class(
            workspace,
            "NHD",
            use_cuda_graph=use_cuda_graph,
            use_tensor_cores=use_tensor_cores,
            paged_kv_indptr_buffer=sparse.indptr if use_cuda_graph else None,
            paged_kv_indices_buffer=sparse.indices if use_cuda_graph else None,
            paged_kv_last_page_len_buffer=sparse.last_page_len if use_cuda_graph else None,
            backend="fa2",
        )

    return make


# --- in the server: the sparse attention op of the torch backend's decode steps ----------------------

WORKSPACE_BYTES = 128 << 20  # FlashInfer's usual decode workspace


class FlashInferSparseAttention:
    """`kernels.sparse_attention.sparse_decode_attention_batched` on FlashInfer (eager, one GPU).

    Same call and results: (q [R, H, D], keys, values [num_slots, KvH, D], slots, valid [R, KvH, W]
    with each row's valid entries first, scale) -> out [R, H, D], natural-log lse [R, H].

    The plan depends only on the per-request counts, the width and the dtypes, so it is made again
    only when they change: the counts are min(budget, seq_len) at every layer of a dynsplit or quest
    step, which is one plan per step at most. Every layer's selection is written into the planned
    index list in place. The buffers grow (doubling) when a step has more requests or a wider
    selection than any before. A request whose KV heads keep different counts (no policy does
    today) cannot share one indptr row layout, so such a call goes to the torch op.
    """

    def __init__(self, make_wrapper, num_kv_heads: int, group: int, head_dim: int, device):
        """make_wrapper: FoldedSparseDecode's wrapper factory (e.g. `flashinfer_wrapper(...)`), called
        again for each rebuilt FoldedSparseDecode."""
        self.make_wrapper = make_wrapper
        self.num_kv_heads, self.group, self.head_dim, self.device = num_kv_heads, group, head_dim, device
        self.sparse: FoldedSparseDecode | None = None
        self._planned = None
        self.plans = 0

    def _fit(self, requests: int, width: int) -> FoldedSparseDecode:
        """The sparse decode, rebuilt with doubled room in the dimension that ran out."""
        sparse = self.sparse
        if sparse is not None and requests <= sparse.max_requests and width <= sparse.max_out:
            return sparse
        room_requests, room_width = (sparse.max_requests, sparse.max_out) if sparse else (4, 512)
        if requests > room_requests:
            room_requests = max(requests, 2 * room_requests)
        if width > room_width:
            room_width = max(width, 2 * room_width)
        self.sparse = FoldedSparseDecode(
            self.make_wrapper, self.num_kv_heads, self.group, self.head_dim, room_requests, room_width, self.device
        )
        self._planned = None
        return self.sparse

    def __call__(self, q, keys, values, slots, valid, scale, counts: list[int] | None = None):
        """counts: each request's valid entries per KV head, if the caller knows them on the host
        (the same for all its heads); otherwise they are read from `valid`, the layer's one host
        sync."""
        if counts is None:
            by_head = valid.sum(dim=2).tolist()  # [R][KvH]
            if any(min(row) != max(row) for row in by_head):
                return sparse_decode_attention_batched(q, keys, values, slots, valid, scale)
            counts = [row[0] for row in by_head]
        if min(counts) < 1:
            return sparse_decode_attention_batched(q, keys, values, slots, valid, scale)
        width = slots.shape[2]
        sparse = self._fit(len(counts), width)
        key = (tuple(counts), width, q.dtype, keys.dtype, float(scale))
        if key != self._planned:
            sparse.plan(counts, width, q.dtype, keys.dtype, float(scale))
            self._planned = key
            self.plans += 1
        sparse.write_indices(slots)
        return sparse.run(q, keys, values)
