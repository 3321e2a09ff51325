"""KV policies selectable with `--kv`. `full` is SGLang's own dense attention (no policy object).

Decode-time (re-select every step): dynsplit, quest.
Prefill-time (rank the prompt once): snapkv, pyramidkv, dynamickv, windowkv, streamingllm, sepllm.
"""

from dynsplit_sglang.policies.base import KVPolicy, RequestView
from dynsplit_sglang.policies.dynamickv import DynamicKVPolicy
from dynsplit_sglang.policies.dynsplit import DynSplitPolicy
from dynsplit_sglang.policies.quest import QuestPolicy
from dynsplit_sglang.policies.snapkv import PyramidKVPolicy, SnapKVPolicy
from dynsplit_sglang.policies.streaming import SepLLMPolicy, StreamingLLMPolicy
from dynsplit_sglang.policies.windowkv import WindowKVPolicy

POLICY_CLASSES: dict[str, type[KVPolicy]] = {
    cls.name: cls
    for cls in (
        DynSplitPolicy, QuestPolicy, SnapKVPolicy, PyramidKVPolicy, DynamicKVPolicy,
        WindowKVPolicy, StreamingLLMPolicy, SepLLMPolicy,
    )
}

__all__ = ["KVPolicy", "RequestView", "POLICY_CLASSES", *[c.__name__ for c in POLICY_CLASSES.values()]]
