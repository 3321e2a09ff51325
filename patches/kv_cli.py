"""`--kv`, `--kv-budget`, `--kv-config` and `--kv-variants` for `python -m sglang.launch_server`
and `sgl.Engine(kv=..., kv_budget=..., kv_config=..., kv_variants=...)`.

The chosen KVConfig travels to the scheduler processes as the bookkeeping attribute
`ServerArgs._kv_config` (underscore attributes are exempt from ServerArgs sealing and pickled with
it). A wrong value stops startup with one line that names the problem and the valid choices.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from sglang.srt.plugins.hook_registry import HookType

from dynsplit_sglang import request_options
from dynsplit_sglang.config import (
    DEFAULT_BUDGET,
    KVConfig,
    KVConfigError,
    PolicyOptions,
    check_policy_name,
    parse_json_object,
    parse_variants,
)
from dynsplit_sglang.hybrid_layers import compressed_layers, refuse_sliding_layers_on_flashinfer
from dynsplit_sglang.policies import POLICIES, POLICY_OPTIONS

BACKEND = "dynsplit"  # the attention backend every compressing policy runs on; full: untouched
# --attention-backend values a compressing policy accepts: ours (the torch path, the default, and
# the FlashInfer subclass).
OUR_BACKENDS = (BACKEND, "dynsplit_flashinfer")
KV_ARGS = ("kv", "kv_budget", "kv_config", "kv_variants")


def _budget_type(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number of tokens, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of tokens, got {value}")
    return value


def _json_object_arg(flag: str):
    """argparse type for a flag whose value is a JSON object; errors drop the flag's name, which
    argparse prints itself."""

    def parse(text: str) -> dict:
        try:
            return parse_json_object(text, flag)
        except KVConfigError as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix(flag).lstrip(": ")) from None

    return parse


def add_kv_args(result, parser: argparse.ArgumentParser):
    group = parser.add_argument_group("dynsplit-sglang KV policies")
    group.add_argument(
        "--kv",
        choices=POLICIES,
        default=None,
        help="KV policy: 'full' is dense attention (the reference); 'dynsplit' attends, per decode "
        "step, only to the top semantic blocks within --kv-budget (DynSplit-KV); the others are "
        "the seed methods and baselines (README.md, Policies; `python -m dynsplit_sglang.policies`).",
    )
    group.add_argument(
        "--kv-budget",
        type=_budget_type,
        default=None,
        help=f"KV tokens one request attends to per decode step, sink and recent window included "
        f"(default {DEFAULT_BUDGET}). Shorter sequences use dense attention.",
    )
    group.add_argument(
        "--kv-config",
        type=_json_object_arg("--kv-config"),
        default=None,
        help='Options of the --kv policy as a JSON object, e.g. \'{"block_size": 16, "delta": 4}\' '
        "for dynsplit. Keys, defaults and meanings: `python -m dynsplit_sglang.policies`.",
    )
    group.add_argument(
        "--kv-variants",
        type=_json_object_arg("--kv-variants"),
        default=None,
        help='More policies this server runs side by side, as a JSON object LABEL -> {"policy": NAME, '
        '...options}, e.g. \'{"snapkv": {}, "fixed": {"policy": "dynsplit", "split": '
        '"fixed_interval"}}\'. A request picks one with custom_params.kv_policy (default: --kv).',
    )


def kv_config_from(kv, kv_budget, kv_config, kv_variants=None) -> KVConfig | None:
    """KVConfig from the user-facing values; None when none was given."""
    if kv is None and kv_budget is None and kv_config is None and kv_variants is None:
        return None
    policy = kv or "full"
    check_policy_name(policy)
    if policy == "full":
        for flag, value in (("--kv-budget", kv_budget), ("--kv-config", kv_config), ("--kv-variants", kv_variants)):
            if value is not None:
                raise KVConfigError(
                    f"{flag} applies to a compressing policy; add e.g. --kv dynsplit "
                    f"(valid --kv choices: {', '.join(POLICIES)})"
                )
    options = kv_config if isinstance(kv_config, PolicyOptions) else POLICY_OPTIONS[policy].from_json(kv_config)
    config = KVConfig(
        policy=policy,
        budget=DEFAULT_BUDGET if kv_budget is None else kv_budget,
        options=options,
        variants=parse_variants(kv_variants, policy),
    )
    config.validate()
    return config


def _hf_config(server_args) -> dict:
    """The model's config.json when the model path is a local folder ({} otherwise)."""
    try:
        with open(os.path.join(str(server_args.model_path), "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return {}
    return config.get("text_config", config)


def check_server_args(server_args, kv: KVConfig) -> None:
    """Refuse option combinations the policy cannot serve correctly."""
    config = _hf_config(server_args)
    context_length = getattr(server_args, "context_length", None) or config.get("max_position_embeddings")
    context_length = None if context_length is None else int(context_length)
    kv.validate(context_length)
    request_options.configure(kv, context_length)
    if kv.policy == "full":
        return
    if config.get("num_hidden_layers"):
        # a model with no layer to compress, or a kind of layer we cannot run
        compressed = compressed_layers(config)
        if len(compressed) < config["num_hidden_layers"] and server_args.attention_backend == "dynsplit_flashinfer":
            refuse_sliding_layers_on_flashinfer(compressed)
    for label, options in kv.policies.items():
        options.check_model(config, "--kv-config" if label == kv.policy else f"--kv-variants {label!r}")
    unsupported = {
        "speculative_algorithm": "speculative decoding",
        "enable_hierarchical_cache": "the hierarchical cache (HiCache)",
        "enable_mixed_chunk": "mixed chunked prefill (--enable-mixed-chunk)",
    }
    for field, what in unsupported.items():
        if getattr(server_args, field, None):
            raise KVConfigError(f"--kv {kv.policy} does not support {what} yet; drop that option or use --kv full")
    if any(getattr(options, "evict", False) for options in kv.policies.values()):
        # eviction changes what a request's row holds: only SGLang's own radix cache knows the rules
        evicting = {
            "enable_lmcache": "LMCache",
            "enable_hisparse": "HiSparse",
        }
        for field, what in evicting.items():
            if getattr(server_args, field, None):
                raise KVConfigError(
                    f"--kv {kv.policy} evicts KV, which {what} does not support; add "
                    f"""--kv-config '{{"evict": false}}' or drop that option"""
                )
        if getattr(server_args, "disaggregation_mode", "null") not in (None, "null"):
            raise KVConfigError(
                f"--kv {kv.policy} evicts KV, which prefill/decode disaggregation does not support; add "
                """--kv-config '{"evict": false}' or drop --disaggregation-mode"""
            )
    for field in ("prefill_attention_backend", "decode_attention_backend"):
        value = getattr(server_args, field, None)
        if value not in (None, *OUR_BACKENDS):
            raise KVConfigError(
                f"--kv {kv.policy} chooses the attention backend itself; drop --{field.replace('_', '-')} {value}"
            )
    if (getattr(server_args, "pp_size", 1) or 1) > 1:
        raise KVConfigError(f"--kv {kv.policy} does not support pipeline parallelism (--pp-size) yet")
    if _asked_decode_graph(server_args) == "full":
        raise KVConfigError(
            f"--kv {kv.policy} cannot capture decode as one full CUDA graph (its decode attention picks "
            "data-dependent blocks); use --cuda-graph-backend-decode breakable, or drop the flag"
        )


def _asked_decode_graph(server_args) -> str | None:
    """The decode CUDA-graph backend the user named, if any: --cuda-graph-config's (it wins, as in
    SGLang) or --cuda-graph-backend-decode's."""
    raw = getattr(server_args, "cuda_graph_config", None)
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError:
            raw = None
    if hasattr(raw, "to_dict"):
        raw = raw.to_dict()
    decode = raw.get("decode") if isinstance(raw, dict) else None
    if isinstance(decode, dict) and decode.get("backend"):
        return decode["backend"]
    return getattr(server_args, "cuda_graph_backend_decode", None)


def _pick_backend(kv: KVConfig | None, current):
    if kv is None or kv.policy == "full":
        return current
    if current not in (None, *OUR_BACKENDS):
        raise KVConfigError(
            f"--kv {kv.policy} chooses the attention backend itself; drop --attention-backend "
            f"{current} (or pick one of {', '.join(OUR_BACKENDS)})"
        )
    return current or BACKEND


def from_cli_args_with_kv(original, cls, args: argparse.Namespace):
    try:
        kv = kv_config_from(*(getattr(args, name, None) for name in KV_ARGS))
        if kv is not None:
            args.attention_backend = _pick_backend(kv, getattr(args, "attention_backend", None))
        server_args = original(cls, args)
        if kv is not None:
            check_server_args(server_args, kv)
            server_args._kv_config = kv.to_dict()
        return server_args
    except KVConfigError as e:
        # The same shape as argparse's own errors: one line, exit status 2.
        print(f"sglang serve: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def engine_server_args(**kwargs):
    """Stands in for `Engine.server_args_class`: accepts kv=, kv_budget=, kv_config=, kv_variants=."""
    from sglang.srt.server_args import ServerArgs

    kv = kv_config_from(*(kwargs.pop(name, None) for name in KV_ARGS))
    if kv is not None:
        kwargs["attention_backend"] = _pick_backend(kv, kwargs.get("attention_backend"))
    server_args = ServerArgs(**kwargs)
    if kv is not None:
        check_server_args(server_args, kv)
        server_args._kv_config = kv.to_dict()
    return server_args


def install_engine_kwargs() -> None:
    """`Engine.__init__` loads plugins itself and only then builds `self.server_args_class(**kwargs)`,
    so a hook on `__init__` would miss the first Engine of a process; this class attribute is read
    after the plugins ran. (HookRegistry's REPLACE would also swap every alias of ServerArgs.)"""
    from sglang.srt.entrypoints.engine import Engine

    Engine.server_args_class = staticmethod(engine_server_args)


HOOKS = [
    ("sglang.srt.server_args.ServerArgs.add_cli_args", HookType.AFTER, add_kv_args),
    ("sglang.srt.server_args.ServerArgs.from_cli_args", HookType.AROUND, from_cli_args_with_kv),
]
