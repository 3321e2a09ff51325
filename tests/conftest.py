import contextlib
import multiprocessing.process
import os
import random
import signal
import subprocess
import sys

import pytest
import torch

from dynsplit_sglang.testing import process_setup

# Without a GPU, Triton kernels run in the interpreter (fp32, small shapes); it must be set
# before a kernel module is imported. With one, they compile for it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# A terminated test run stops as Ctrl-C stops it (KeyboardInterrupt: not one failed test, the end of
# the run), so fixtures stop the servers and engines they started. (tests/engine_utils.py keeps
# SGLang's engines from taking SIGTERM over.)
signal.signal(signal.SIGTERM, signal.default_int_handler)
# And when the run is killed outright (SIGKILL: no cleanup runs), what it started goes with it:
# every Python process started from here on, and every one those start, dies with its parent from
# its first line (SGLang's scheduler and detokenizer arm that only after seconds of imports).
os.environ["PYTHONPATH"] = process_setup.pythonpath_with(process_setup.die_with_parent_folder())


@pytest.fixture(autouse=True)
def _same_random_state():
    """Every test starts from the same random state: a failure reproduces, and an assertion that
    holds only for most draws cannot turn one CI run in ten red."""
    random.seed(0)
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# The marker rule: a test that starts an SGLang engine or server (itself, through a fixture or a
# benchmark's code) is marked `server`, which `make test-fast` (-m "not server") leaves out. An
# unmarked test that starts one fails here, so none lands in the fast target unnoticed: SGLang's
# engine starts its scheduler with multiprocessing (a target in `sglang.`), a server is a
# `sglang.launch_server` command. (A test that runs a benchmark in a subprocess, which then starts
# an engine, is out of this check's sight: mark it by hand, as test_accuracy_quick.py does.)
UNMARKED = "{} in a test not marked `server`: mark it (pytestmark = pytest.mark.server for a module)"


@contextlib.contextmanager
def _no_sglang_processes():
    start, popen_init = multiprocessing.process.BaseProcess.start, subprocess.Popen.__init__

    def checked_start(self):
        target = getattr(self, "_target", None)
        if getattr(target, "__module__", "").startswith("sglang."):
            pytest.fail(UNMARKED.format(f"an SGLang engine starts {target.__module__}.{target.__name__}"))
        return start(self)

    def checked_popen_init(self, args, *rest, **kwargs):
        argv = [args] if isinstance(args, (str, bytes, os.PathLike)) else list(args)
        if any("sglang.launch_server" in str(a) for a in argv):
            pytest.fail(UNMARKED.format("an SGLang server starts"))
        return popen_init(self, args, *rest, **kwargs)

    multiprocessing.process.BaseProcess.start = checked_start
    subprocess.Popen.__init__ = checked_popen_init
    try:
        yield
    finally:
        multiprocessing.process.BaseProcess.start, subprocess.Popen.__init__ = start, popen_init


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    """Fixtures included (module-scoped ones are set up with their module's first test)."""
    if item.get_closest_marker("server"):
        return (yield)
    with _no_sglang_processes():
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    if item.get_closest_marker("server"):
        return (yield)
    with _no_sglang_processes():
        return (yield)


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("DYNSPLIT_CACHE", os.path.join(REPO, ".cache"))


@pytest.fixture(scope="session")
def tiny_model():
    from dynsplit_sglang.default_model import tiny_model_path

    return str(tiny_model_path())


@pytest.fixture(scope="session")
def smollm2():
    from dynsplit_sglang.default_model import smollm2_path

    return str(smollm2_path())


def pytest_unconfigure(config):
    """Detach the logging handlers that hold pytest's capture streams, which close after this.

    SGLang's engines configure logging in the test process with `logging.basicConfig(force=True)`,
    which binds the root logger's handler to the sys.stderr of that moment: pytest's capture. Code
    that runs after pytest, at interpreter exit, logs through it into a closed file: SGLang's
    at-exit `Engine.shutdown` of every engine made outside tests/engine_utils.py (the accuracy
    benchmark's, which shut down already and log `kill_process_tree called`), each printing a
    "--- Logging error --- ValueError: I/O operation on closed file" block after the summary.
    The engines themselves are shut down by the code that started them; what is left is where
    their late log lines go. Without the handler a warning or error still reaches stderr (logging's
    last resort); the INFO lines are dropped.
    """
    import logging

    real = {sys.__stdout__, sys.__stderr__}
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.StreamHandler) and handler.stream not in real:
            root.removeHandler(handler)
