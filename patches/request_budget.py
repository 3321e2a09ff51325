"""`custom_params.kv_budget` and `kv_policy`: check them with the other sampling parameters,
record them per request."""

from __future__ import annotations

from sglang.srt.plugins.hook_registry import HookType

from dynsplit_sglang import request_options


def check_kv_budget(result, sampling_params, *args, **kwargs):
    request_options.check(sampling_params.custom_params)
    return result


def record_kv_budget(result, req, *args, **kwargs):
    request_options.record(req)
    return result


HOOKS = [
    ("sglang.srt.sampling.sampling_params.SamplingParams.verify", HookType.AFTER, check_kv_budget),
    ("sglang.srt.managers.schedule_batch.Req.__init__", HookType.AFTER, record_kv_budget),
]
