"""Decode attention over a different set of KV slots per KV head (the torch path, and the
reference of the FlashInfer sparse decode in `dynsplit_sglang/sparse_decode_flashinfer.py`)."""

from __future__ import annotations

import torch
from torch.profiler import record_function


def sparse_decode_attention(q, keys, values, slots, valid, scale):
    """Attention of one decode query over a different set of KV slots per KV head.

    q:      [H, D] query; keys, values: [num_slots, KvH, D] one layer's KV buffers.
    slots:  [KvH, B] int64 KV slots each KV head attends to; valid: [KvH, B] bool.
    returns output [H, D] (dtype of q) and the log-sum-exp [H] fp32 of the attended logits.
    """
    out, lse = _sparse_attention(q[None], keys, values, slots[None], valid[None], scale)
    return out[0], lse[0]


def sparse_decode_attention_batched(q, keys, values, slots, valid, scale, counts=None):
    """`sparse_decode_attention` for R requests: q [R, H, D], slots and valid [R, KvH, B] (each
    row's valid entries first). returns output [R, H, D] and lse [R, H]. counts: each request's
    valid entries (the same for all its KV heads), when known on the host (else read from valid).

    Requests are grouped by the width of their own selection and each group runs as one batch
    cut to that width, so every request gets exactly the shapes it would get alone and the same
    bits (CPU kernels round by shape; padding to the batch's widest would change the last bit and
    make a request's tokens depend on what else is in its batch)."""
    num_heads = q.shape[1]
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[0], num_heads, dtype=torch.float32, device=q.device)
    widths = counts if counts is not None else valid.sum(dim=2).amax(dim=1).tolist()  # [R] each one's own width
    if len(set(widths)) == 1:  # the usual case: one budget for every request
        width = widths[0]
        # Counts from the host fill every row to the width: nothing to mask.
        return _sparse_attention(
            q, keys, values, slots[:, :, :width], None if counts is not None else valid[:, :, :width], scale
        )
    for width in sorted(set(widths)):
        group = torch.tensor([k for k, w in enumerate(widths) if w == width], device=q.device)
        out[group], lse[group] = _sparse_attention(
            q[group], keys, values, slots[group, :, :width], valid[group, :, :width], scale
        )
    return out, lse


def _sparse_attention(q, keys, values, slots, valid, scale):
    """q [R, H, D]; slots, valid [R, KvH, B] (valid None: all) -> output [R, H, D] (dtype of q), lse [R, H] fp32."""
    batch, num_heads, dim = q.shape
    num_kv_heads = slots.shape[1]
    # Row (slot, head) of the [num_slots * KvH, D] view: index_select copies whole rows, several
    # times faster on the CPU than indexing with a (slot, head) pair.
    with record_function("dynsplit:gather"):
        rows = (slots * num_kv_heads + torch.arange(num_kv_heads, device=q.device)[:, None]).view(-1)
        k = keys.reshape(-1, dim).index_select(0, rows).view(batch, num_kv_heads, -1, dim).float()  # [R, KvH, B, D]
        v = values.reshape(-1, dim).index_select(0, rows).view(batch, num_kv_heads, -1, dim).float()
    qg = q.float().view(batch, num_kv_heads, num_heads // num_kv_heads, dim)
    logits = torch.matmul(qg, k.transpose(-1, -2)) * scale  # [R, KvH, G, B]
    if valid is not None:  # None: every entry is valid
        logits.masked_fill_(~valid[:, :, None, :], float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    out = torch.matmul(torch.exp(logits - lse[..., None]), v)
    return out.reshape(batch, num_heads, dim).to(q.dtype), lse.reshape(batch, num_heads)
