"""Device bytes a policy keeps per KV slot (its side tables), measured, not hand-counted.

The policy is built twice on the `meta` device (shapes only, nothing allocated) for two pool
sizes; the difference of the bytes of every tensor it holds, over the difference of slots, is
what one more KV slot costs. So a new table in any policy is counted without touching this file.
"""

from __future__ import annotations

import logging
import math

import torch

from dynsplit_sglang.block_table import ModelShape
from dynsplit_sglang.config import KVConfig

_SLOTS = (1 << 16, 1 << 17)


def bytes_per_slot(kv: KVConfig, shape: ModelShape, dtype: torch.dtype) -> int:
    """Bytes of policy state per KV slot (rounded up) for `kv` (every --kv-variants member included)."""
    from dynsplit_sglang.policies.policy_set import build_policy

    quiet = logging.getLogger("dynsplit_sglang")  # no tokenizer here: the policies would warn about it
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        small, large = (tensor_bytes(build_policy(kv, shape, n, dtype, "meta")) for n in _SLOTS)
    finally:
        quiet.setLevel(level)
    return math.ceil((large - small) / (_SLOTS[1] - _SLOTS[0]))


def tensor_bytes(obj, seen: set | None = None) -> int:
    """Bytes of the tensors reachable from obj through containers and dynsplit_sglang objects."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return obj.nelement() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple, set, frozenset)):
        return sum(tensor_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__") and type(obj).__module__.startswith("dynsplit_sglang"):
        return sum(tensor_bytes(v, seen) for v in vars(obj).values())
    return 0
