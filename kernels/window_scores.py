"""Observation-window scores (SnapKV, PyramidKV, DynamicKV, WindowKV): how much attention the last
prompt queries pay to each earlier token."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def window_scores(q: torch.Tensor, k: torch.Tensor, q_start: int, scale: float) -> torch.Tensor:
    """Softmax attention of the window queries, summed over the window and over the query heads of
    each KV head (causal: a query sees keys up to its own position).

    q:       [w, H, D] queries at positions q_start .. q_start+w-1.
    k:       [T, KvH, D] keys at positions 0 .. T-1, T >= q_start + w.
    returns: [KvH, T] fp32.
    """
    w, num_heads, _ = q.shape
    total, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    qg = q.float().view(w, num_kv_heads, group, -1)
    logits = torch.einsum("wkgd,tkd->kgwt", qg, k.float()) * scale  # [KvH, G, w, T]
    key_pos = torch.arange(total, device=q.device)
    q_pos = q_start + torch.arange(w, device=q.device)
    logits.masked_fill_(key_pos[None, :] > q_pos[:, None], float("-inf"))
    return torch.softmax(logits, dim=-1).sum(dim=(1, 2))


def pool_scores(scores: torch.Tensor, kernel_size: int, pooling: str) -> torch.Tensor:
    """Smooth scores along positions with a centred 1-D pooling (SnapKV's clustering step).

    scores: [heads, P] fp32; kernel_size odd; pooling "avg" (zero padding counted, as
    F.avg_pool1d does by default) or "max". returns [heads, P].
    """
    if kernel_size <= 1 or scores.shape[-1] == 0:
        return scores
    x = scores[:, None, :]
    if pooling == "max":
        out = F.max_pool1d(x, kernel_size, stride=1, padding=kernel_size // 2)
    else:
        out = F.avg_pool1d(x, kernel_size, stride=1, padding=kernel_size // 2)
    return out[:, 0, :]
