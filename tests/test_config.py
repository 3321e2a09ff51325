import pytest

from dynsplit_sglang.config import KVConfig, KVConfigError
from dynsplit_sglang.patches.kv_cli import kv_config_from
from dynsplit_sglang.policies import DynSplitOptions


def test_defaults_are_valid_and_documented_bounds():
    cfg = DynSplitOptions()
    cfg.validate()
    assert (cfg.min_block, cfg.max_block) == (12, 20)
    assert cfg.always_kept == cfg.sink_tokens + cfg.max_open_tail + cfg.recent_tokens
    KVConfig(policy="dynsplit").validate(context_length=8192)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(kv="foo"), "unknown policy 'foo'; valid choices: full, dynsplit, quest"),
        (dict(kv="dynsplit", kv_budget=0), "--kv-budget must be a positive number"),
        (dict(kv="dynsplit", kv_budget=-5), "--kv-budget must be a positive number"),
        (dict(kv="dynsplit", kv_budget=10), "must be at least 64"),
        (dict(kv="dynsplit", kv_config='{"block_size": 8, "delta": 8}'), "must be larger than 'delta'"),
        (dict(kv="dynsplit", kv_config="{not json"), "is not valid JSON"),
        (dict(kv="dynsplit", kv_config="[1, 2]"), "must be a JSON object"),
        (
            dict(kv="dynsplit", kv_config='{"C": 16}'),
            "unknown key(s) C for --kv dynsplit; valid keys: evict, resident, resident_rank, block_size",
        ),
        (dict(kv="dynsplit", kv_config='{"alpha": -1}'), "'alpha' must be a number >= 0"),
        (dict(kv="dynsplit", kv_config='{"candidates": "commas"}'), "'candidates' must be one of delimiters, all"),
        (dict(kv="dynsplit", kv_config='{"score_layers": []}'), "'score_layers' must be a non-empty list"),
        (dict(kv="dynsplit", kv_config='{"delimiter_chars": ""}'), "'delimiter_chars' must be a non-empty string"),
        (dict(kv="dynsplit", kv_config='{"delimiter_chars": 7}'), "'delimiter_chars' must be a non-empty string"),
        (dict(kv="dynsplit", kv_config='{"candidates": "all", "delimiter_chars": "."}'), "but 'candidates' is \"all\""),
        (dict(kv_budget=512), "--kv-budget applies to a compressing policy; add e.g. --kv dynsplit"),
        (dict(kv="full", kv_config="{}"), "--kv-config applies to a compressing policy"),
    ],
)
def test_bad_values_name_the_problem(kwargs, message):
    args = {"kv": None, "kv_budget": None, "kv_config": None, **kwargs}
    with pytest.raises(KVConfigError) as e:
        kv_config_from(args["kv"], args["kv_budget"], args["kv_config"])
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_budget_larger_than_context_is_rejected():
    with pytest.raises(KVConfigError, match=r"--kv-budget 9000 is larger than the model's context length \(8192\)"):
        KVConfig(policy="dynsplit", budget=9000).validate(context_length=8192)


def test_config_round_trips_through_a_dict():
    kv = kv_config_from("dynsplit", 300, {"block_size": 32, "delta": 8, "score_layers": [1, 2]})
    assert KVConfig.from_dict(kv.to_dict()) == kv
    assert kv.options.score_layers == (1, 2)


def test_no_kv_flags_means_untouched_sglang():
    assert kv_config_from(None, None, None) is None


def test_attention_backend_choice_for_a_compressing_policy():
    from dynsplit_sglang.patches.kv_cli import _pick_backend

    kv = kv_config_from("dynsplit", None, None)
    assert _pick_backend(kv, None) == "dynsplit"  # the torch path by default
    assert _pick_backend(kv, "dynsplit_flashinfer") == "dynsplit_flashinfer"
    with pytest.raises(
        KVConfigError, match=r"drop --attention-backend triton \(or pick one of dynsplit, dynsplit_flashinfer\)"
    ):
        _pick_backend(kv, "triton")
    assert _pick_backend(kv_config_from("full", None, None), "triton") == "triton"  # full leaves it alone
