"""CUDA graphs with a compressing --kv: which graph modes a server gets, and the breakable-graph
decode of `--attention-backend dynsplit_flashinfer` as a replay drives it (emulated on the CPU,
tests/graph_replay.py; a real capture needs CUDA)."""

import pytest
from transformers import AutoTokenizer

from dynsplit_sglang.testing.process_setup import in_sglang_processes
from tests.engine_utils import SAMPLE_TEXT, engine


def resolved_graphs(model, *flags):
    from sglang.srt.arg_groups.overrides import resolved_view
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import prepare_server_args

    load_plugins()
    server_args = prepare_server_args(["--model-path", model, "--device", "cpu", "--kv", "dynsplit", *flags])
    server_args.resolve_once()
    config = resolved_view(server_args).cuda_graph_config
    return config.decode.backend, config.prefill.backend


@pytest.mark.parametrize(
    "flags, decode",
    [
        (["--cuda-graph-backend-decode", "breakable"], "breakable"),
        (["--attention-backend", "dynsplit_flashinfer", "--cuda-graph-backend-decode", "breakable"], "breakable"),
        (
            [
                "--attention-backend",
                "dynsplit_flashinfer",
                "--cuda-graph-config",
                '{"decode": {"backend": "breakable"}}',
            ],
            "breakable",
        ),
        (["--attention-backend", "dynsplit_flashinfer"], "disabled"),  # SGLang's default (full) cannot work
        ([], "disabled"),
    ],
)
def test_graph_modes_a_compressing_policy_gets(tiny_model, flags, decode):
    assert resolved_graphs(tiny_model, *flags) == (decode, "disabled")


def answers(eng, prompts, budgets):
    params = [
        {
            "temperature": 0,
            "max_new_tokens": 8,
            "ignore_eos": True,
            **({"custom_params": {"kv_budget": b}} if b else {}),
        }
        for b in budgets
    ]
    out = eng.generate(input_ids=prompts, sampling_params=params, return_logprob=True)
    return [(o["output_ids"], [lp for lp, *_ in o["meta_info"]["output_token_logprobs"]]) for o in out]


@pytest.mark.server
@pytest.mark.parametrize(
    "kv,backend", [("dynsplit", "dynsplit"), ("dynsplit", "dynsplit_flashinfer"), ("snapkv", "dynsplit")]
)
def test_breakable_graph_replay_gives_the_eager_tokens(tiny_model, monkeypatch, tmp_path, kv, backend):
    """Every decode step as a breakable-graph replay gives it (padded batch, no request ids,
    a capture's dummy batch first) against the eager torch backend: the same tokens, and logprobs
    within the two attention implementations' rounding. The batch mixes a request within its
    budget and sparse ones with their own budgets, which a replay must find without request ids."""
    ids = AutoTokenizer.from_pretrained(tiny_model)(SAMPLE_TEXT * 10, add_special_tokens=False).input_ids
    prompts, budgets = [ids[:300], ids[5:105], ids[9:420]], [96, None, 200]  # None: the server's 128
    with engine(tiny_model, kv=kv, kv_budget=128) as eng:
        want = answers(eng, prompts, budgets)
    # The replay path (and the FlashInfer stand-ins) in the second engine's scheduler only.
    log = tmp_path / "replay.log"
    monkeypatch.setenv("GRAPH_REPLAY_LOG", str(log))
    monkeypatch.setenv("SGLANG_FLASHINFER_WORKSPACE_SIZE", str(8 << 20))
    with (
        in_sglang_processes("tests.graph_replay:install"),
        engine(tiny_model, kv=kv, kv_budget=128, attention_backend=backend) as eng,
    ):
        got = answers(eng, prompts, budgets)
    events = log.read_text().splitlines()
    assert events[0] == "capture ok" and set(events[1:]) == {"replay"}, events[:5]
    assert len(events) >= 8  # every decode step went through the replay path
    for (g_ids, g_lp), (w_ids, w_lp) in zip(got, want):
        assert g_ids == w_ids
        assert g_lp == pytest.approx(w_lp, abs=1e-4)


def test_the_decode_graph_mode_a_user_named():
    """--cuda-graph-config (JSON text, a dict from the Engine API, or SGLang's config object) wins
    over --cuda-graph-backend-decode, as in SGLang; nothing named is None."""
    from types import SimpleNamespace

    from sglang.srt.model_executor.cuda_graph_config import default_cuda_graph_config, with_phase

    from dynsplit_sglang.patches.kv_cli import _asked_decode_graph

    def asked(config=None, flag=None):
        return _asked_decode_graph(SimpleNamespace(cuda_graph_config=config, cuda_graph_backend_decode=flag))

    assert asked() is None and asked(flag="breakable") == "breakable"
    assert asked('{"decode": {"backend": "full"}}', "breakable") == "full"
    assert asked({"decode": {"backend": "breakable"}}, "full") == "breakable"
    assert asked({"prefill": {"backend": "disabled"}}, "full") == "full"
    assert asked(default_cuda_graph_config()) is None  # SGLang's object lists only what was set
    assert asked(with_phase(default_cuda_graph_config(), "decode", backend="breakable")) == "breakable"
