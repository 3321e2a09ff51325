"""Charge a compressing policy's per-slot tables to SGLang's KV-pool sizing.

SGLang sizes its KV pool from the memory left after the weights: tokens = available bytes //
cell_size, where cell_size is one token's KV bytes over all layers. dynsplit and quest keep
tables per KV slot (DD-Select rows, flags and a block record of key min/max per layer and KV
head per block: with the defaults about 1/12 of the KV bytes). The backend builds them after the pool,
so uncharged they would come on top of SGLang's plan, and a GPU whose memory the pool fills
could run out at startup. Added to cell_size, they shrink the pool by their share instead.
"""

from __future__ import annotations

import logging

from sglang.srt.plugins.hook_registry import HookType

from dynsplit_sglang.block_table import ModelShape
from dynsplit_sglang.config import KVConfig
from dynsplit_sglang.hybrid_layers import compressed_layers
from dynsplit_sglang.policy_memory import bytes_per_slot

logger = logging.getLogger(__name__)

_logged: set = set()

TARGET = "sglang.srt.model_executor.pool_configurator.DefaultPoolConfigurator._compute_cell_size"


def charge_policy_tables(result, configurator, kvc, num_layers):
    data = getattr(kvc.server_args, "_kv_config", None)
    if not data or kvc.is_draft_worker or kvc.use_mla_backend or not result:
        return None
    kv = KVConfig.from_dict(data)
    if kv.policy == "full":
        return None
    from sglang.srt.runtime_context import get_parallel

    tp = get_parallel().attn_tp_size
    mc = kvc.model_config
    shape = ModelShape(
        num_layers=len(compressed_layers(mc.hf_text_config, num_layers)),  # tables for compressed layers only
        num_heads=mc.num_attention_heads // tp,
        num_kv_heads=mc.get_num_kv_heads(tp),
        head_dim=mc.head_dim,
    )
    extra = bytes_per_slot(kv, shape, kvc.kv_cache_dtype)
    if extra and (kv.policy, extra, result) not in _logged:  # SGLang asks more than once
        _logged.add((kv.policy, extra, result))
        logger.info(
            "dynsplit-sglang: --kv %s keeps %d bytes per KV slot beside the %d of the KV itself; "
            "the KV pool is sized for both",
            kv.policy,
            extra,
            result,
        )
    return result + extra


HOOKS = [(TARGET, HookType.AFTER, charge_policy_tables)]
