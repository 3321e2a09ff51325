"""The named hooks dynsplit-sglang applies to SGLang 0.5.23 (installed as `dynsplit_sglang.patches`).

Each hook is a (target, kind, function) triple registered with SGLang's own `HookRegistry`; no
SGLang source is copied. `check_targets()` runs at plugin load and names any target that no longer
resolves, so an SGLang upgrade fails loudly instead of silently serving without `--kv`.

Hooks, by module: target (kind): why.
- kv_cli: ServerArgs.add_cli_args (after): add --kv, --kv-budget, --kv-config, --kv-variants.
- kv_cli: ServerArgs.from_cli_args (around): validate them, pick the attention backend, carry the
  config to the scheduler.
- kv_cli: Engine.server_args_class (attribute): the same for
  `sgl.Engine(kv=..., kv_budget=..., kv_config=..., kv_variants=...)`.
- prefix_reserve: Req._compute_max_prefix_len (around): a radix hit recomputes the last prompt
  tokens a prefill-time policy ranks with.
- evict_kv: UnifiedRadixCache.checkpoint (around): no insert past an evicting request's compacted
  prompt; once compacted, its private prompt before that goes to the tree (or is freed) and its
  lock shrinks back to its own radix hit.
- evict_kv: Scheduler.get_new_batch_prefill (before): after eviction gave KV back, try admitting
  waiting requests again (SGLang would wait for a running one to leave).
- request_budget: SamplingParams.verify (after): check custom_params.kv_budget and kv_policy like
  the other sampling parameters.
- request_budget: Req.__init__ (after): record custom_params.kv_budget and kv_policy for the
  attention backend.
- cuda_graph: attention_hook.handle_attention_backend_compatibility (after): our backends decode
  only under breakable graphs (attention an eager break): keep those, turn off full decode graphs
  and prefill graphs.
- pool_memory: DefaultPoolConfigurator._compute_cell_size (after): size the KV pool with the
  policy's per-slot tables included, so they fit beside it.
- kv_observability: SchedulerMetricsCollector.__init__ (after): our metrics beside SGLang's
  (--enable-metrics); Scheduler.get_output_streamer_class (after): meta_info["kv_compression"]
  of each finished request; SchedulerInternalStateController.get_internal_state (after): the
  --kv config in /server_info.
- cpu_rotary_import: the import system, only without CUDA and without vllm: SGLang's
  RotaryEmbedding imports vllm._custom_ops on a plain CPU, then never calls it.
"""

from __future__ import annotations

import pkgutil

from dynsplit_sglang.patches import (
    cpu_rotary_import,
    cuda_graph,
    evict_kv,
    kv_cli,
    kv_observability,
    pool_memory,
    prefix_reserve,
    request_budget,
)

HOOKS = (
    kv_cli.HOOKS
    + cuda_graph.HOOKS
    + pool_memory.HOOKS
    + prefix_reserve.HOOKS
    + evict_kv.HOOKS
    + request_budget.HOOKS
    + kv_observability.HOOKS
)
ATTRIBUTES = ["sglang.srt.entrypoints.engine.Engine.server_args_class"]


def check_targets() -> None:
    missing = []
    for target in [t for t, _, _ in HOOKS] + ATTRIBUTES:
        try:
            pkgutil.resolve_name(target)
        except (ImportError, AttributeError):
            missing.append(target)
    if missing:
        raise RuntimeError(
            "dynsplit-sglang: SGLang hook targets not found (is sglang==0.5.23 installed?): " + ", ".join(missing)
        )


def apply() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry

    check_targets()
    for target, kind, fn in HOOKS:
        HookRegistry.register(target, fn, kind)
    kv_cli.install_engine_kwargs()
    cpu_rotary_import.install()
