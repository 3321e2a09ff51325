"""Make `dynsplit_sglang.kernels` importable from a source checkout that is not pip-installed.

pyproject maps the package `dynsplit_sglang.kernels` to the top-level `kernels/` folder; a pip
install (editable or not) sets that mapping up, a bare `PYTHONPATH=.` does not. The GPU box runs
from a copy of the tree without installing it, so this registers the folder under that name.
It does nothing when the package is installed. Imported by `benchmarks.gpu`, and loaded into
pytest with `-p benchmarks.gpu.source_tree` (run_all.sh) before the tests import the kernels.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def ensure_kernels_importable() -> None:
    """Register REPO/kernels as `dynsplit_sglang.kernels` unless that already imports."""
    try:
        importlib.import_module("dynsplit_sglang.kernels")
        return
    except ModuleNotFoundError as e:
        if e.name != "dynsplit_sglang.kernels":
            raise
    import dynsplit_sglang

    folder = os.path.join(REPO, "kernels")
    spec = importlib.util.spec_from_file_location(
        "dynsplit_sglang.kernels", os.path.join(folder, "__init__.py"), submodule_search_locations=[folder]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    dynsplit_sglang.kernels = module


ensure_kernels_importable()
