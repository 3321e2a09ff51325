"""Dense prefill attention that also returns each query's log-sum-exp (the row statistic
DD-Select needs), over SGLang's KV pool layout; pure torch, no SGLang import."""

from __future__ import annotations

import torch


def extend_attention(
    query, output, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens, prefix_lens, extend_lens, scale
) -> list[torch.Tensor]:
    """Causal attention of each request's new tokens over its whole sequence, written into output.

    query, output: [T, H, D] the new tokens of every request, back to back.
    k_cache, v_cache: [num_slots, KvH, D]; req_to_token: [rows, max_len] KV slots per position.
    req_pool_indices, seq_lens, prefix_lens, extend_lens: [R] per request.
    returns: per request the [H, n] fp32 log-sum-exp of each new query's logits (DD-Select needs
    it, and the kernel computes it anyway).

    SGLang's torch-native backend pads each request's queries to the whole sequence and computes
    the cached prefix's attention again, N x N work for every prefill chunk and every radix hit.
    Here only the n new queries attend: a miss is one causal kernel call (the very call SDPA makes
    on the CPU, so bit-identical to `--kv full`); with a cached prefix the queries attend to the
    prefix (no mask) and to themselves (causal) in two kernel calls merged by their lse, n x N
    work without an explicit mask (which would send SDPA to a slower kernel). The merge rounds
    differently from one call over the whole row (about 1e-7, tests/test_backend_ops.py).
    """
    q_all = query.movedim(0, 1)  # [H, T, D]
    lses = []
    start = 0
    for row, total, prefix, n in zip(
        req_pool_indices.tolist(), seq_lens.tolist(), prefix_lens.tolist(), extend_lens.tolist()
    ):
        slots = req_to_token[row, :total]
        q = q_all[None, :, start : start + n]
        k, v = k_cache[slots].movedim(0, 1)[None], v_cache[slots].movedim(0, 1)[None]
        if prefix == 0:
            out, lse = attention_with_lse(q, k, v, scale, causal=True)
        else:
            o1, l1 = attention_with_lse(q, k[:, :, :prefix], v[:, :, :prefix], scale, causal=False)
            o2, l2 = attention_with_lse(q, k[:, :, prefix:], v[:, :, prefix:], scale, causal=True)
            lse = torch.logaddexp(l1, l2)
            out = o1.float() * (l1 - lse).exp()[..., None] + o2.float() * (l2 - lse).exp()[..., None]
        output[start : start + n] = out[0].movedim(0, 1).to(output.dtype)
        lses.append(lse[0])
        start += n
    return lses


def sliding_window_attention(
    query, output, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens, prefix_lens, extend_lens, scale, window
) -> None:
    """Sliding-window causal attention of each request's new tokens (a hybrid model's local
    layers), written into output: the query at position p reads the keys at [p - window, p]
    (SGLang's convention: `window` is the model's sliding_window - 1). Arguments as in
    `extend_attention`.

    In blocks of queries, each against only the keys its window reaches: n x (block + window)
    work, where SGLang's torch-native path builds an N x N mask and attends every pair (minutes
    per layer at 32k on a CPU)."""
    q_all = query.movedim(0, 1)  # [H, T, D]
    block = max(window + 1, 1024)
    start = 0
    for row, total, prefix, n in zip(
        req_pool_indices.tolist(), seq_lens.tolist(), prefix_lens.tolist(), extend_lens.tolist()
    ):
        for a in range(prefix, total, block):
            b = min(a + block, total)
            lo = max(0, a - window)
            slots = req_to_token[row, lo:b]
            k, v = k_cache[slots].movedim(0, 1)[None], v_cache[slots].movedim(0, 1)[None]
            q_pos = torch.arange(a, b, device=query.device)[:, None]
            k_pos = torch.arange(lo, b, device=query.device)[None, :]
            mask = (k_pos <= q_pos) & (k_pos >= q_pos - window)  # [b - a, b - lo], True: attend
            q = q_all[None, :, start + a - prefix : start + b - prefix]
            out = torch.nn.functional.scaled_dot_product_attention(
                q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1]
            )
            output[start + a - prefix : start + b - prefix] = out[0].movedim(0, 1).to(output.dtype)
        start += n


def window_slots(req_to_token, rows: torch.Tensor, seq_lens: torch.Tensor, window: int):
    """The KV slots a decode query reads in a sliding-window layer: each request's last
    min(n, window + 1) positions. rows, seq_lens: [R] int64. returns slots, valid [R, window + 1]
    (each row's valid entries first)."""
    first = (seq_lens - (window + 1)).clamp(min=0)
    positions = first[:, None] + torch.arange(window + 1, device=seq_lens.device)
    valid = positions < seq_lens[:, None]
    slots = req_to_token[rows[:, None], positions.clamp(max=req_to_token.shape[1] - 1)].to(torch.int64)
    return torch.where(valid, slots, 0), valid


def attention_with_lse(q, k, v, scale, causal):
    """Softmax attention and its log-sum-exp.

    q: [1, H, n, D]; k, v: [1, KvH, T, D] (grouped-query heads allowed); causal needs n == T.
    returns out [1, H, n, D] (dtype of q) and lse [1, H, n] fp32.

    On the CPU this is the flash kernel F.scaled_dot_product_attention itself dispatches to (it
    returns the lse, the public function drops it). On a CUDA GPU with fp16/bf16 it is SDPA's
    FlashAttention-2 kernel, which also returns the (natural-log) lse and, unlike the formula,
    never holds the [n, T] logits: a 128k prompt fits. Elsewhere the plain formula, in query
    chunks so the logits stay small.
    """
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
        return out, lse.float()
    if _cuda_flash_fits(q):
        group = q.shape[1] // k.shape[1]  # the CUDA flash op takes equal head counts
        if group > 1:
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, scale=scale)[:2]
        return out, lse.float()
    return attention_with_lse_formula(q, k, v, scale, causal)


def _cuda_flash_fits(q: torch.Tensor) -> bool:
    """SDPA's CUDA FlashAttention-2 kernel runs on Ampere and newer, fp16/bf16, head dim <= 256 and a
    multiple of 8."""
    return (
        q.device.type == "cuda"
        and q.dtype in (torch.float16, torch.bfloat16)
        and q.shape[-1] <= 256
        and q.shape[-1] % 8 == 0
        and torch.cuda.get_device_capability(q.device)[0] >= 8
    )


def attention_with_lse_formula(q, k, v, scale, causal):
    """`attention_with_lse` written out (same arguments and results), in query chunks of 1024."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1).float(), v.repeat_interleave(group, dim=1).float()
    key_pos = torch.arange(k.shape[2], device=q.device)
    outs, lses = [], []
    for c0 in range(0, q.shape[2], 1024):
        qc = q[:, :, c0 : c0 + 1024].float()
        logits = torch.einsum("bhqd,bhkd->bhqk", qc, k) * scale
        if causal:
            query_pos = c0 + torch.arange(qc.shape[2], device=q.device)
            logits.masked_fill_(key_pos[None, :] > query_pos[:, None], float("-inf"))
        lse = torch.logsumexp(logits, dim=-1)
        outs.append(torch.einsum("bhqk,bhkd->bhqd", torch.exp(logits - lse[..., None]), v))
        lses.append(lse)
    return torch.cat(outs, dim=2).to(q.dtype), torch.cat(lses, dim=2)
