"""On a plain CPU (no CUDA, no SGLANG_USE_CPU_ENGINE), SGLang's RotaryEmbedding does
`from vllm._custom_ops import rotary_embedding` to pick a fallback kernel, then dispatches to its
pure-torch `forward_native` and never calls it. This module answers that import, and only that
one, when vllm is not installed: a real vllm always wins (the finder sits last on sys.meta_path
and is not installed at all when vllm exists or CUDA is available).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

_MODULES = ("vllm", "vllm._custom_ops")


def rotary_embedding(*args, **kwargs):
    raise NotImplementedError(
        "dynsplit-sglang: vllm._custom_ops.rotary_embedding is an import placeholder on CPU; "
        "SGLang is expected to use RotaryEmbedding.forward_native here"
    )


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname in _MODULES:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=fullname == "vllm")
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        if spec.name == "vllm":
            module.__path__ = []
        else:
            module.rotary_embedding = rotary_embedding
        return module

    def exec_module(self, module):
        pass


def install() -> None:
    import torch

    if torch.cuda.is_available() or importlib.util.find_spec("vllm") is not None:
        return
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.append(_Finder())
