"""The README's policy and option tables, made from the registry (so they cannot drift from the
dataclass defaults; tests/test_policy_tables.py checks the README against them).

    python -m dynsplit_sglang.policies            # the README's block: every policy, dynsplit's options
    python -m dynsplit_sglang.policies snapkv     # one policy's options: key, default, meaning
"""

from __future__ import annotations

import dataclasses
import json

from dynsplit_sglang.policies import POLICY_CLASSES

BEGIN, END = "<!-- policy-options:begin -->", "<!-- policy-options:end -->"
DETAILED = "dynsplit"  # the policy whose option table the README shows in full


def default_text(value) -> str:
    """A default as the user writes it in `--kv-config` JSON."""
    return json.dumps(list(value) if isinstance(value, tuple) else value, ensure_ascii=False)


def options_table(policy: str) -> str:
    """key | default | meaning of one policy's options."""
    options = POLICY_CLASSES[policy].Options
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    for f in dataclasses.fields(options):
        meaning = f.metadata.get("help", "").replace("|", "\\|")
        rows.append(f"| `{f.name}` | `{default_text(f.default)}` | {meaning} |")
    return "\n".join(rows)


def policies_table() -> str:
    """One row per policy: kind, what a decode step attends to, options with their defaults."""
    rows = [
        "| `--kv` | kind | what a decode step attends to | options (`--kv-config`), defaults |",
        "| --- | --- | --- | --- |",
    ]
    for name, cls in POLICY_CLASSES.items():
        if name == DETAILED:
            options = "table below"
        else:
            options = ", ".join(f"`{f.name}` {default_text(f.default)}" for f in dataclasses.fields(cls.Options))
        rows.append(f"| `{name}` | {cls.kind} | {cls.summary} | {options} |")
    return "\n".join(rows)


def readme_block() -> str:
    """What the README holds between BEGIN and END."""
    return f"{policies_table()}\n\n`{DETAILED}` options:\n\n{options_table(DETAILED)}"


def readme_section(readme: str) -> str:
    """The README's text between BEGIN and END, without the surrounding blank lines."""
    start, end = readme.index(BEGIN) + len(BEGIN), readme.index(END)
    return readme[start:end].strip("\n")
