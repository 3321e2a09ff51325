"""What compression does, where SGLang users look: /metrics, each response's meta_info and
/server_info (only on a server whose `--kv` compresses).

- SchedulerMetricsCollector.__init__ (after): with `--enable-metrics`, create our metrics next to
  SGLang's scheduler metrics, with its labels (metrics.py).
- Scheduler.get_output_streamer_class (after): a streamer that adds `meta_info["kv_compression"]`
  to each finished request's output: `[{policy, budget, evict, decode_steps,
  mean_attended_tokens, mean_held_tokens, resident_tokens, evicted_tokens}]` (SGLang's customized
  output info: a list per request, one entry, sent with its last output).
- SchedulerInternalStateController.get_internal_state (after): `internal_states[i]["kv"]` of
  /server_info: the --kv policy, budget, options and variants, the model layers it compresses
  (compressed_layers: all but a hybrid model's sliding-window ones), and eviction's totals
  (evicted_requests, evicted_tokens).
"""

from __future__ import annotations

import functools
import logging

from sglang.srt.plugins.hook_registry import HookType

from dynsplit_sglang import compression_stats, eviction, metrics
from dynsplit_sglang.hybrid_layers import compressed_layers

logger = logging.getLogger(__name__)

META_INFO_KEY = "kv_compression"


def create_metrics(result, collector, *args, server_args=None, **kwargs):
    # SGLang passes it by keyword; positionally it follows `labels`
    metrics.install(collector, server_args if server_args is not None else args[1] if len(args) > 1 else None)
    return result


def _finished_figures(reqs) -> dict[str, list]:
    """meta_info["kv_compression"] of the requests that finish in this output (one entry each),
    [] for the others."""
    stats = compression_stats.current()
    finished = [r.rid for r in reqs if r.finished()]
    if stats is None or not finished:
        return {}
    figures = stats.end(finished)
    return {META_INFO_KEY: [[figures[r.rid].meta_info()] if r.finished() and r.rid in figures else [] for r in reqs]}


@functools.cache
def _streamer_class():
    # imported here, in the scheduler: the plugin loads in every process, and this module is
    # best not pulled into the server's before SGLang sets up its metrics
    from sglang.srt.managers.scheduler_components.output_streamer import SchedulerOutputStreamer

    class KVOutputStreamer(SchedulerOutputStreamer):
        """SGLang's output streamer, plus each finished request's compression figures."""

        has_additional_customized_info = True

        def build_additional_customized_info(self, reqs) -> dict[str, list]:
            return _finished_figures(reqs)

    return KVOutputStreamer


def compression_streamer(result, scheduler, *args, **kwargs):
    if not getattr(scheduler.server_args, "_kv_config", None):
        return result
    if getattr(scheduler, "rust_server", None) is not None:
        logger.warning("dynsplit-sglang: no meta_info[%r] with SGLang's Rust server", META_INFO_KEY)
        return result
    return _streamer_class()


def add_kv_state(result, controller, *args, **kwargs):
    kv = getattr(controller.scheduler.server_args, "_kv_config", None)
    if kv and getattr(result, "internal_state", None) is not None:
        plan = eviction.current()
        totals = {k: v for k, v in (plan.stats() if plan is not None else {}).items() if k.startswith("evicted_")}
        config = getattr(getattr(controller.scheduler, "model_config", None), "hf_text_config", None)
        layers = {} if config is None else {"compressed_layers": list(compressed_layers(config))}
        result.internal_state["kv"] = {**kv, **layers, **totals}
    return result


HOOKS = [
    (
        "sglang.srt.observability.metrics_collector.SchedulerMetricsCollector.__init__",
        HookType.AFTER,
        create_metrics,
    ),
    ("sglang.srt.managers.scheduler.Scheduler.get_output_streamer_class", HookType.AFTER, compression_streamer),
    (
        "sglang.srt.managers.scheduler_components.internal_state.SchedulerInternalStateController.get_internal_state",
        HookType.AFTER,
        add_kv_state,
    ),
]
