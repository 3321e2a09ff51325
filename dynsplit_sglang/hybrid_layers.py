"""Which layers a `--kv` policy compresses: every layer of a plain model; only the full-attention
layers of a hybrid sliding-window model (Gemma 3: one layer in six).

A sliding-window layer reads the last `window` tokens whatever the context, so compressing it
would save nothing; it keeps SGLang's own attention and the policy never sees it. The policy's
layer indices (its tables, per-layer budgets, `score_layers`) count the compressed layers only:
on Gemma-3-270M (layers 5, 11 and 17 global) policy layer 1 is model layer 11.
"""

from __future__ import annotations

from collections.abc import Mapping

from dynsplit_sglang.config import KVConfigError

FULL, SLIDING = "full_attention", "sliding_attention"


def compressed_layers(config, num_layers: int | None = None) -> tuple[int, ...]:
    """The model layer ids a policy compresses, ascending.

    config: the model's text config, a transformers config or config.json's dict; its
    `layer_types` (transformers' name for a hybrid layout) decides, every layer without it.
    num_layers: the layers the model runs (default: its num_hidden_layers)."""
    get = config.get if isinstance(config, Mapping) else lambda key: getattr(config, key, None)
    count = num_layers if num_layers is not None else get("num_hidden_layers")
    types = get("layer_types")
    if not types:
        return tuple(range(count))
    other = sorted({t for t in types[:count] if t not in (FULL, SLIDING)})
    if other:
        raise KVConfigError(
            "--kv supports full-attention and sliding-window layers only; "
            f"this model also has {', '.join(other)} layers"
        )
    layers = tuple(i for i, t in enumerate(types[:count]) if t == FULL)
    if not layers:
        raise KVConfigError(
            "--kv: every layer of this model is sliding-window; there is no full-attention KV to compress"
        )
    return layers


def refuse_sliding_layers_on_flashinfer(compressed: tuple[int, ...]) -> None:
    """--attention-backend dynsplit_flashinfer serves models without sliding layers only: its
    decode runs the folded sparse op in every layer and skips SGLang's decode plan, which the
    sliding-window wrapper would need."""
    raise KVConfigError(
        "--attention-backend dynsplit_flashinfer does not support sliding-window layers yet (this "
        f"model's layers other than {list(compressed)}); drop the flag (torch backend)"
    )
