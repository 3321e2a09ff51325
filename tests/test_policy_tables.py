"""One home per policy: the registry is built from the policy classes, and the README's policy and
option tables are what the registry prints (`python -m dynsplit_sglang.policies`)."""

import dataclasses
import os
import subprocess
import sys

import pytest

from dynsplit_sglang.config import KVConfig, KVConfigError
from dynsplit_sglang.patches.kv_cli import add_kv_args
from dynsplit_sglang.policies import POLICIES, POLICY_CLASSES, POLICY_OPTIONS
from dynsplit_sglang.policies.tables import readme_block, readme_section

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_readme_tables_are_the_registry_s():
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    assert readme_section(readme) == readme_block(), (
        "README.md's policy tables differ from the policy classes: paste the output of "
        "`python -m dynsplit_sglang.policies` between the policy-options markers"
    )


def test_every_policy_declares_its_name_kind_summary_and_documented_options():
    assert POLICIES == ("full", *POLICY_CLASSES)
    for name, cls in POLICY_CLASSES.items():
        assert cls.Options.policy == name and POLICY_OPTIONS[name] is cls.Options
        assert cls.kind in ("decode-time", "prefill-time") and cls.summary
        for f in dataclasses.fields(cls.Options):
            assert f.metadata.get("help"), f"{name}: option {f.name!r} has no help text"
        cls.Options().validate()  # the defaults are valid


def test_the_table_defaults_are_the_dataclass_defaults():
    block = readme_block()
    for name, cls in POLICY_CLASSES.items():
        for f in dataclasses.fields(cls.Options):
            assert f"`{f.name}`" in block
        if name == "snapkv":
            assert '`window` 32, `kernel_size` 5, `pooling` "avg"' in block
    assert "| `block_size` | `16` |" in block and "| `score_layers` | `null` |" in block


def test_the_cli_choices_and_config_validation_read_the_registry():
    import argparse

    parser = argparse.ArgumentParser()
    add_kv_args(None, parser)
    kv_action = next(a for a in parser._actions if a.dest == "kv")
    assert tuple(kv_action.choices) == POLICIES
    for name in POLICY_CLASSES:
        assert type(KVConfig(name).options) is POLICY_OPTIONS[name]
    with pytest.raises(KVConfigError, match="valid choices: full, dynsplit, quest"):
        KVConfig("h2o").validate()
    with pytest.raises(
        KVConfigError, match="unknown key.*valid keys: evict, resident, resident_rank, page_size, dense_layers"
    ):
        POLICY_OPTIONS["quest"].from_json('{"block_size": 8}')


def test_the_command_prints_one_policy_s_table():
    out = subprocess.run(
        [sys.executable, "-m", "dynsplit_sglang.policies", "quest"], capture_output=True, text=True, check=True
    ).stdout
    assert out.splitlines()[5].startswith("| `page_size` | `16` |")
