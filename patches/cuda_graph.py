"""CUDA graphs for the `dynsplit` and `dynsplit_flashinfer` attention backends.

A compressing policy's decode attention has data-dependent shapes and reads the host (which
blocks each request attends to, when a block closes), so it cannot sit inside a captured graph.
SGLang's breakable CUDA graphs capture everything else and run marked calls eagerly between the
captured segments: both backends mark their per-layer decode attention that way, so with
`--cuda-graph-backend-decode breakable` decode replays the model's GEMMs, norms and RoPE from
graphs. Otherwise decode runs eager, as SGLang does for `torch_native`, so a GPU server starts
instead of failing at capture (an explicit full decode graph is refused at startup by kv_cli).
Prefill always runs eager (the score layers' row statistics come from our own attention calls)."""

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
    phases = [ah.Phase.PREFILL]
    if cfg.cuda_graph_config.decode.backend == ah.Backend.BREAKABLE:
        logger.info(
            "--attention-backend %s: decode replays breakable CUDA graphs (attention runs eagerly "
            "between the captured segments); prefill runs eager",
            backend,
        )
    else:
        phases.append(ah.Phase.DECODE)
        logger.warning(
            "Cuda graph is disabled for --attention-backend %s (it captures decode only as "
            "breakable graphs: --cuda-graph-backend-decode breakable)",
            backend,
        )
    for phase in phases:
        ah.declare_resolution(
            server_args,
            "_dynsplit_attention_backend_compatibility",
            cuda_graph_config=ah.with_phase(cfg.cuda_graph_config, phase, backend=ah.Backend.DISABLED),
        )
    return None


HOOKS = [(TARGET, HookType.AFTER, disable_graphs_for_dynsplit)]
