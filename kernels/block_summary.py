"""Uniform block records: fixed-size key summaries of variable-length blocks."""

from __future__ import annotations

import torch


def block_min_max(keys: torch.Tensor, slots: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Elementwise min and max of each block's keys (Quest-style bounds).

    keys:    [num_slots, KvH, D] one layer's key buffer.
    slots:   [nb, P] int64 KV slots of each block, padded to P = longest block (padding ignored).
    lengths: [nb] int64 real length of each block (>= 1).
    returns: kmin, kmax, each [nb, KvH, D] in the dtype of `keys`.
    """
    k = keys[slots].float()  # [nb, P, KvH, D]
    valid = (torch.arange(slots.shape[1], device=slots.device)[None, :] < lengths[:, None])[..., None, None]
    kmin = k.masked_fill(~valid, float("inf")).amin(dim=1)
    kmax = k.masked_fill(~valid, float("-inf")).amax(dim=1)
    return kmin.to(keys.dtype), kmax.to(keys.dtype)
