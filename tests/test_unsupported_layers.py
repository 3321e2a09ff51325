"""The layers the policies cannot serve are refused at their first forward with one line naming
what the layer is (PolicyHost._check_layer), without an engine: MLA-style heads, cross attention,
bidirectional layers, attention logit soft-capping (Gemma 2), and a sliding window the model's
config does not name in layer_types. Which layers are compressed comes from layer_types
(hybrid_layers.py); models with no layer to compress, or other kinds of layers, are refused."""

from types import SimpleNamespace

import pytest
from sglang.srt.layers.radix_attention import AttentionType

from dynsplit_sglang.config import KVConfig, KVConfigError
from dynsplit_sglang.hybrid_layers import compressed_layers
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
    def __init__(self, layer_types=None):
        self.kv = KVConfig("dynsplit")
        compressed = compressed_layers({"num_hidden_layers": 6, "layer_types": layer_types})
        self._layer_index = [compressed.index(i) if i in compressed else None for i in range(6)]
        self._window = 512 if len(compressed) < 6 else 0


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"qk_head_dim": 192}, "--kv dynsplit does not support cross attention or MLA-style heads"),
        ({"is_cross_attention": True}, "--kv dynsplit does not support cross attention or MLA-style heads"),
        ({"sliding_window_size": 511}, "whose config lists them in layer_types; layer 3 is sliding-window"),
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


GEMMA3 = ["sliding_attention"] * 5 + ["full_attention"]  # Gemma 3's pattern


def test_a_hybrid_models_sliding_layers_pass_and_its_global_layers_are_compressed():
    assert compressed_layers({"num_hidden_layers": 6, "layer_types": GEMMA3}) == (5,)
    assert compressed_layers({"num_hidden_layers": 18, "layer_types": GEMMA3 * 3}) == (5, 11, 17)
    assert compressed_layers({"num_hidden_layers": 4}) == (0, 1, 2, 3)  # no layer_types: every layer
    host = Host(GEMMA3)
    host._check_layer(layer(layer_id=2, sliding_window_size=511))
    host._check_layer(layer(layer_id=5))
    assert host._policy_layer(layer(layer_id=5)) == 0 and host._policy_layer(layer(layer_id=2)) is None
    with pytest.raises(ValueError, match="layer 3 has no window though layer_types says sliding_attention"):
        host._check_layer(layer())
    with pytest.raises(ValueError, match="one sliding window for all layers; layer 2 slides over 1024 tokens"):
        host._check_layer(layer(layer_id=2, sliding_window_size=1023))


@pytest.mark.parametrize(
    "layer_types, message",
    [
        (["sliding_attention"] * 6, "every layer of this model is sliding-window; there is no full-attention KV"),
        (["linear_attention", "full_attention"] * 3, "this model also has linear_attention layers"),
    ],
)
def test_a_model_without_layers_to_compress_is_refused_in_one_line(layer_types, message):
    with pytest.raises(KVConfigError, match=message) as error:
        compressed_layers({"num_hidden_layers": 6, "layer_types": layer_types})
    assert "\n" not in str(error.value)
