"""The KV policies selectable with `--kv`, and the one registry built from their classes.

`full` is SGLang's own dense attention (no policy object, no options).
Decode-time (re-select every step): dynsplit, quest.
Prefill-time (rank the prompt once): snapkv, pyramidkv, dynamickv, windowkv, streamingllm, sepllm.

Each policy class declares its options dataclass (`Options`), `kind` and `summary`; the CLI choices
(`patches/kv_cli.py`), `--kv-config` validation (`config.KVConfig`) and the README's tables
(`python -m dynsplit_sglang.policies`) read this registry.
"""

from dynsplit_sglang.config import FullOptions, PolicyOptions
from dynsplit_sglang.policies.base import KVPolicy, PolicyNeeds, RequestView
from dynsplit_sglang.policies.dynamickv import DynamicKVOptions, DynamicKVPolicy
from dynsplit_sglang.policies.dynsplit import DynSplitOptions, DynSplitPolicy
from dynsplit_sglang.policies.quest import QuestOptions, QuestPolicy
from dynsplit_sglang.policies.snapkv import PyramidKVOptions, PyramidKVPolicy, SnapKVOptions, SnapKVPolicy
from dynsplit_sglang.policies.streaming import SepLLMOptions, SepLLMPolicy, StreamingLLMOptions, StreamingLLMPolicy
from dynsplit_sglang.policies.windowkv import WindowKVOptions, WindowKVPolicy

POLICY_CLASSES: dict[str, type[KVPolicy]] = {
    cls.name: cls
    for cls in (
        DynSplitPolicy,
        QuestPolicy,
        SnapKVPolicy,
        PyramidKVPolicy,
        DynamicKVPolicy,
        WindowKVPolicy,
        StreamingLLMPolicy,
        SepLLMPolicy,
    )
}
# --kv name -> its options dataclass; `full` first (the default, the reference).
POLICY_OPTIONS: dict[str, type[PolicyOptions]] = {
    FullOptions.policy: FullOptions,
    **{name: cls.Options for name, cls in POLICY_CLASSES.items()},
}
POLICIES = tuple(POLICY_OPTIONS)

__all__ = [
    "POLICIES",
    "POLICY_CLASSES",
    "POLICY_OPTIONS",
    "DynamicKVOptions",
    "DynamicKVPolicy",
    "DynSplitOptions",
    "DynSplitPolicy",
    "KVPolicy",
    "PolicyNeeds",
    "PyramidKVOptions",
    "PyramidKVPolicy",
    "QuestOptions",
    "QuestPolicy",
    "RequestView",
    "SepLLMOptions",
    "SepLLMPolicy",
    "SnapKVOptions",
    "SnapKVPolicy",
    "StreamingLLMOptions",
    "StreamingLLMPolicy",
    "WindowKVOptions",
    "WindowKVPolicy",
]
