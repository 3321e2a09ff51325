"""The layers the policies cannot serve are refused at their first forward with one line naming
what the layer is (PolicyHost._check_layer), without an engine: MLA-style heads, cross attention,
sliding-window and bidirectional layers, attention logit soft-capping (Gemma 2)."""

from types import SimpleNamespace

import pytest
from sglang.srt.layers.radix_attention import AttentionType

from dynsplit_sglang.config import KVConfig
from dynsplit_sglang.policy_host import PolicyHost


def layer(**changes):
    plain = dict(
        layer_id=3,
        is_cross_attention=False,
        qk_head_dim=64,
        v_head_dim=64,
        attn_type=AttentionType.DECODER,
        sliding_window_size=-1,
        logit_cap=0.0,
    )
    return SimpleNamespace(**{**plain, **changes})


class Host(PolicyHost):
    def __init__(self):
        self.kv = KVConfig("dynsplit")


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"qk_head_dim": 192}, "--kv dynsplit does not support cross attention or MLA-style heads"),
        ({"is_cross_attention": True}, "--kv dynsplit does not support cross attention or MLA-style heads"),
        ({"sliding_window_size": 511}, "supports causal full-attention layers only; layer 3 is sliding-window"),
        ({"attn_type": AttentionType.ENCODER_ONLY}, "layer 3 is bidirectional"),
        ({"attn_type": AttentionType.DECODER_BIDIRECTIONAL}, "layer 3 is bidirectional"),
        ({"logit_cap": 50.0}, "does not support attention logit soft-capping (layer 3: logit_cap 50.0)"),
    ],
)
def test_an_unsupported_layer_is_refused_in_one_line(changes, message):
    with pytest.raises(ValueError) as error:
        Host()._check_layer(layer(**changes))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_causal_full_attention_layer_passes():
    Host()._check_layer(layer())
    Host()._check_layer(layer(sliding_window_size=None, logit_cap=None))
