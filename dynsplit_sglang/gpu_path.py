"""The opt-in parts of the GPU fast path in the server, chosen by environment variables.

    DYNSPLIT_SPARSE_ATTENTION=torch|flashinfer   decode attention over the selected KV slots
    DYNSPLIT_SELECTION=torch|triton              dynsplit/quest block selection at decode

Both default to torch (the path every test and benchmark ran). The GPU choices need a CUDA
device; they stay opt-in until a GPU has run them in a server. A wrong value stops startup with
a message naming the variable.
"""

from __future__ import annotations

import os

import torch

from dynsplit_sglang.kernels.sparse_attention import sparse_decode_attention_batched
from dynsplit_sglang.sparse_decode_flashinfer import WORKSPACE_BYTES, FlashInferSparseAttention, flashinfer_wrapper

SPARSE_ATTENTION_ENV = "DYNSPLIT_SPARSE_ATTENTION"
SELECTION_ENV = "DYNSPLIT_SELECTION"


def _choice(name: str, valid: tuple[str, ...], device, env) -> str:
    """The value of $name (first of `valid` when unset); anything but the first needs CUDA."""
    choice = (env if env is not None else os.environ).get(name, valid[0]).strip().lower() or valid[0]
    if choice not in valid:
        raise ValueError(f"${name}={choice!r}: valid values are {' and '.join(repr(v) for v in valid)}")
    if choice != valid[0] and torch.device(device).type != "cuda":
        raise ValueError(f"${name}={choice} needs a CUDA device; this server runs on {device}")
    return choice


def selection_kernel(device, env=None) -> str:
    """'torch' or 'triton' ($DYNSPLIT_SELECTION): how dynsplit and quest select blocks at decode."""
    return _choice(SELECTION_ENV, ("torch", "triton"), device, env)


def sparse_attention_op(device, num_kv_heads: int, group: int, head_dim: int, env=None):
    """The sparse attention op the torch backend's decode uses, chosen by $DYNSPLIT_SPARSE_ATTENTION:
    `torch` (default) the torch op, `flashinfer` FlashInferSparseAttention (CUDA, flashinfer
    installed). returns (name, op); a wrong value or an impossible choice is a ValueError naming it."""
    choice = _choice(SPARSE_ATTENTION_ENV, ("torch", "flashinfer"), device, env)
    if choice == "torch":
        return "torch", sparse_decode_attention_batched
    try:
        import flashinfer  # noqa: F401
    except ImportError as e:
        raise ValueError(f"${SPARSE_ATTENTION_ENV}=flashinfer needs the flashinfer-python package ({e})") from None
    workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
    op = FlashInferSparseAttention(
        flashinfer_wrapper(workspace, use_cuda_graph=False), num_kv_heads, group, head_dim, device
    )
    return "flashinfer", op
