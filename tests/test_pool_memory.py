"""The KV pool is sized with the policy's per-slot tables included (patches/pool_memory.py)."""

import dataclasses
import types

import torch

from dynsplit_sglang.block_table import ModelShape
from dynsplit_sglang.config import KVConfig
from dynsplit_sglang.patches import pool_memory
from dynsplit_sglang.policies import DynSplitOptions, QuestOptions, SnapKVOptions
from dynsplit_sglang.policies.policy_set import build_policy
from dynsplit_sglang.policy_memory import bytes_per_slot, tensor_bytes

SHAPE = ModelShape(num_layers=4, num_heads=4, num_kv_heads=2, head_dim=8)


def test_dynsplit_tables_per_slot_match_what_it_allocates():
    kv = KVConfig("dynsplit", 64, DynSplitOptions())
    per_slot = bytes_per_slot(kv, SHAPE, torch.float32)
    # DD-Select row (lookahead 8 x fp32) + candidate flag + slot -> record, and one record per
    # min_block = 12 tokens: key min and max per layer and KV head (2 x 4 x 2 x 8 x fp32) + start/end.
    assert per_slot == 8 * 4 + 1 + 8 + (2 * 4 * 2 * 8 * 4 + 16) / 12  # = 85
    # measured on `meta`, it is what real tensors of two pool sizes differ by
    real = [tensor_bytes(build_policy(kv, SHAPE, n, torch.float32, "cpu")) for n in (1200, 2400)]
    assert abs((real[1] - real[0]) - 1200 * per_slot) <= 1200
    # bf16 KV halves the records; quest's 16-token pages need fewer of them
    assert bytes_per_slot(kv, SHAPE, torch.bfloat16) < per_slot
    assert bytes_per_slot(KVConfig("quest", 64, QuestOptions()), SHAPE, torch.float32) < per_slot


def test_variants_are_charged_for_every_member():
    alone = bytes_per_slot(KVConfig("dynsplit", 64, DynSplitOptions()), SHAPE, torch.float32)
    quest = bytes_per_slot(KVConfig("quest", 64, QuestOptions()), SHAPE, torch.float32)
    both = KVConfig("dynsplit", 64, DynSplitOptions(), variants={"q": QuestOptions(), "s": SnapKVOptions()})
    assert abs(bytes_per_slot(both, SHAPE, torch.float32) - (alone + quest)) <= 2


def test_the_hook_adds_the_tables_to_the_kv_cell(monkeypatch):
    import sglang.srt.runtime_context as rc

    monkeypatch.setattr(rc, "get_parallel", lambda: types.SimpleNamespace(attn_tp_size=1))
    text = types.SimpleNamespace(num_hidden_layers=4, layer_types=None)
    model = types.SimpleNamespace(
        num_attention_heads=4, head_dim=8, get_num_kv_heads=lambda tp: 2 // tp, hf_text_config=text
    )

    def kvc(kv):
        args = types.SimpleNamespace(_kv_config=None if kv is None else kv.to_dict())
        return types.SimpleNamespace(
            server_args=args,
            is_draft_worker=False,
            use_mla_backend=False,
            model_config=model,
            kv_cache_dtype=torch.float32,
        )

    kv_cell = 2 * 4 * 2 * 8 * 4
    dynsplit = KVConfig("dynsplit", 64, DynSplitOptions())
    got = pool_memory.charge_policy_tables(kv_cell, None, kvc(dynsplit), 4)
    assert got == kv_cell + bytes_per_slot(dynsplit, SHAPE, torch.float32)
    assert pool_memory.charge_policy_tables(kv_cell, None, kvc(None), 4) is None  # --kv not given
    assert pool_memory.charge_policy_tables(kv_cell, None, kvc(KVConfig("full", 64, None)), 4) is None
    # a hybrid model: tables for its full-attention layers only (here 2 of 4)
    text.layer_types = ["sliding_attention", "full_attention"] * 2
    hybrid = bytes_per_slot(dynsplit, dataclasses.replace(SHAPE, num_layers=2), torch.float32)
    assert pool_memory.charge_policy_tables(kv_cell, None, kvc(dynsplit), 4) == kv_cell + hybrid
