"""SGLang plugin entry point (`[project.entry-points."sglang.srt.plugins"] dynsplit`).

SGLang calls `register()` in every process (server, scheduler, detokenizer) before it parses
arguments or builds a model. It registers the `dynsplit` attention backend and applies the named
hooks of `dynsplit_sglang.patches`. (Tests that need their own code in those processes wrap this
function from outside: `dynsplit_sglang.testing.process_setup`.)
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

SUPPORTED_SGLANG = "0.5.23"


def _kv_of(model_runner):
    from dynsplit_sglang.config import KVConfig

    data = getattr(model_runner.server_args, "_kv_config", None)
    return KVConfig.from_dict(data) if data else KVConfig(policy="dynsplit")


def create_backend(model_runner):
    """Attention-backend factory for `--attention-backend dynsplit` (set by `--kv dynsplit`)."""
    from dynsplit_sglang.backend_torch import SparseTorchAttnBackend

    return SparseTorchAttnBackend(model_runner, _kv_of(model_runner))


def create_flashinfer_backend(model_runner):
    """Attention-backend factory for `--attention-backend dynsplit_flashinfer` (with a --kv policy)."""
    from dynsplit_sglang.backend_flashinfer import SparseFlashInferAttnBackend

    return SparseFlashInferAttnBackend(model_runner, _kv_of(model_runner))


def register() -> None:
    import sglang
    from sglang.srt.layers.attention.attention_registry import register_attention_backend
    from sglang.srt.server_args import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices

    from dynsplit_sglang import patches

    if sglang.__version__ != SUPPORTED_SGLANG:
        logger.warning("dynsplit-sglang is tested with sglang==%s, found %s", SUPPORTED_SGLANG, sglang.__version__)
    for name, factory in (("dynsplit", create_backend), ("dynsplit_flashinfer", create_flashinfer_backend)):
        if name not in ATTENTION_BACKEND_CHOICES:
            add_attention_backend_choices([name])
        register_attention_backend(name)(factory)
    patches.apply()
