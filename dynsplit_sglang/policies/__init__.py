"""KV policies selectable with `--kv`. `full` is SGLang's own dense attention (no policy object)."""

from dynsplit_sglang.policies.base import KVPolicy, RequestView
from dynsplit_sglang.policies.dynsplit import DynSplitPolicy

POLICY_CLASSES: dict[str, type[KVPolicy]] = {DynSplitPolicy.name: DynSplitPolicy}

__all__ = ["KVPolicy", "RequestView", "DynSplitPolicy", "POLICY_CLASSES"]
