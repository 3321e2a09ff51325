import os
import random
import signal
import sys

import pytest
import torch

# Without a GPU, Triton kernels run in the interpreter (fp32, small shapes); it must be set
# before a kernel module is imported. With one, they compile for it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# A terminated test run unwinds like Ctrl-C, so fixtures stop the servers and engines they started.
signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


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
