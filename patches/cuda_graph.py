"""Disable CUDA graphs for the `dynsplit` and `dynsplit_flashinfer` attention backends (neither
has a graph path yet), exactly as SGLang does for `torch_native`, so a GPU server starts instead
of failing at capture."""

from __future__ import annotations

import logging

from sglang.srt.plugins.hook_registry import HookType

from dynsplit_sglang.patches.kv_cli import OUR_BACKENDS

logger = logging.getLogger(__name__)

TARGET = "sglang.srt.arg_groups.attention_hook.handle_attention_backend_compatibility"


def disable_graphs_for_dynsplit(result, server_args):
    from sglang.srt.arg_groups import attention_hook as ah

    cfg = ah.resolving_view(server_args)
    backend = ah.resolved_view(server_args).attention_backend
    if backend not in OUR_BACKENDS:
        return None
    logger.warning("Cuda graph is disabled because --attention-backend %s has no CUDA-graph path yet", backend)
    for phase in (ah.Phase.DECODE, ah.Phase.PREFILL):
        ah.declare_resolution(
            server_args,
            "_dynsplit_attention_backend_compatibility",
            cuda_graph_config=ah.with_phase(cfg.cuda_graph_config, phase, backend=ah.Backend.DISABLED),
        )
    return None


HOOKS = [(TARGET, HookType.AFTER, disable_graphs_for_dynsplit)]
