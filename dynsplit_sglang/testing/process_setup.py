"""Run a test's setup (`module:function`) in every process of an SGLang engine or server it starts.

Some tests need their own code inside SGLang's processes: a log of what each forward hands the
policy (tests/forward_log.py), an emulated CUDA-graph replay (tests/graph_replay.py), a scheduler
that fails (tests/failing_setup.py), FlashInfer's stand-ins (`fake_flashinfer.install_in_sglang`),
the accuracy probe (`benchmarks/accuracy/blocks.py --kept`). SGLang starts its scheduler and
detokenizer as fresh interpreters (multiprocessing "spawn", set by `sgl.Engine`), and a server's
launcher is one too, so nothing patched in the test's own process reaches them. What each fresh
interpreter does run is the first `sitecustomize` module on its path (the `site` module imports it
at start-up, after PYTHONPATH is on sys.path), and what it inherits is the environment.

    with in_sglang_processes("tests.forward_log:install"):
        eng = sgl.Engine(...)          # or a server: start_server(...), subprocess.Popen(...)

`in_sglang_processes` writes a folder holding a `sitecustomize.py` for these setups and, for the
`with` block, puts it first on PYTHONPATH in os.environ, which the processes started inside the
block inherit (start them there; they keep it for their lifetime). In each of them that
sitecustomize replaces `dynsplit_sglang.plugin.register` with a wrapper that calls it and then each
setup. SGLang's `load_plugins()` resolves the entry point `dynsplit_sglang.plugin:register` by
attribute when it runs (in the launcher, the scheduler and the detokenizer, before any model is
built), so it calls the wrapper: the setups run after the plugin registered, in every SGLang process
started in the block, as a plugin would. Then it runs the `sitecustomize` it shadows, if there is
one (Debian's system Python has one; the next of our own when blocks are nested, so nested setups
add up).

The test's own process is left alone: an in-process `sgl.Engine` runs the setups only in the
processes it starts. A setup that must not act in a server's launcher (also a MainProcess) checks
`multiprocessing.current_process().name`. The folders live until this process exits.

`die_with_parent_folder()` is the same trick for one more thing: its sitecustomize arms
PR_SET_PDEATHSIG (SIGKILL when the parent dies, Linux) first thing in every Python process
started with it on PYTHONPATH, and exits at once if the parent is already gone. SGLang's scheduler
and detokenizer arm it themselves only after their imports, seconds after they start, so a test
run killed with SIGKILL in that window left them running for good (a server's too, though its
launcher dies with pytest). tests/conftest.py puts this folder on PYTHONPATH for the whole run.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import pkgutil
import shutil
import tempfile

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # holds dynsplit_sglang/
_folders: dict[object, str] = {}

_SETUPS = """\
# Written by dynsplit_sglang.testing.process_setup for a test's SGLang processes (see there).
import sys

try:
    from dynsplit_sglang.testing.process_setup import set_up_this_process
except ImportError:  # a source tree that is neither installed nor on PYTHONPATH
    sys.path.append({root!r})
    from dynsplit_sglang.testing.process_setup import set_up_this_process

set_up_this_process({setups!r})
"""

_DIE_WITH_PARENT = """\
# Written by dynsplit_sglang.testing.process_setup (see there): this process dies with its parent.
import ctypes
import os
import signal

try:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
except (OSError, AttributeError):  # not Linux
    pass
else:
    if os.getppid() == 1:  # the parent died before that: nobody would end this process
        os._exit(1)
"""

# Every generated sitecustomize ends with this: it runs the one it hides (the first after its
# folder on sys.path), e.g. Debian's, or the next of ours.
_CHAIN = """
import importlib.machinery as _machinery
import importlib.util as _util
import os as _os
import sys as _sys

_here = _os.path.realpath(_os.path.dirname(__file__))
_entries = [_os.path.realpath(p or _os.curdir) for p in _sys.path]
_later = _sys.path[len(_entries) - _entries[::-1].index(_here) :] if _here in _entries else []
_spec = _machinery.PathFinder.find_spec("sitecustomize", _later)
if _spec is not None and _spec.loader is not None:
    _spec.loader.exec_module(_util.module_from_spec(_spec))
"""


def _folder(key, text: str) -> str:
    """A folder holding a sitecustomize.py with `text` (made once per key, removed at exit)."""
    if key not in _folders:
        folder = tempfile.mkdtemp(prefix="dynsplit-site-")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        with open(os.path.join(folder, "sitecustomize.py"), "w") as f:
            f.write(text + _CHAIN)
        _folders[key] = folder
    return _folders[key]


def _check(setup: str) -> None:
    module, sep, function = setup.partition(":")
    if not sep or not function or importlib.util.find_spec(module) is None:
        raise ValueError(f"a setup is 'module:function' with an importable module, got {setup!r}")


def sitecustomize_folder(*setups: str) -> str:
    """The folder whose sitecustomize.py runs these setups (made once per set, removed at exit)."""
    for setup in setups:
        _check(setup)
    return _folder(setups, _SETUPS.format(root=_ROOT, setups=setups))


def die_with_parent_folder() -> str:
    """The folder whose sitecustomize.py makes a process die with its parent (see above)."""
    return _folder("die with parent", _DIE_WITH_PARENT)


def pythonpath_with(folder: str, env: dict[str, str] | None = None) -> str:
    """`env`'s (default os.environ's) PYTHONPATH with `folder` first (and only there)."""
    path = (os.environ if env is None else env).get("PYTHONPATH")
    return os.pathsep.join([folder, *(p for p in path.split(os.pathsep) if p != folder)] if path else [folder])


def environment(*setups: str, env: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of `env` (default os.environ) under which SGLang processes run these setups."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = pythonpath_with(sitecustomize_folder(*setups), env)
    return env


@contextlib.contextmanager
def in_sglang_processes(*setups: str):
    """Within the block, SGLang processes that start run these setups after the plugin registered."""
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = environment(*setups)["PYTHONPATH"]
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = before


def set_up_this_process(setups: tuple[str, ...]) -> None:
    """Called by the generated sitecustomize at interpreter start: wrap the plugin's `register`."""
    from dynsplit_sglang import plugin

    register = plugin.register

    def register_then_set_up() -> None:
        register()
        for setup in setups:
            pkgutil.resolve_name(setup)()

    plugin.register = register_then_set_up
