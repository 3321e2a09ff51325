"""Lowering Triton kernels to sm_90 without a GPU, shared by the kernel tests' compile checks.

Each check runs in a subprocess without TRITON_INTERPRET (in the test process the interpreter
stands in for the compiler): the script gets `lower(fn, sig, constexprs, num_warps, name)`, which
compiles to PTX and cubin for sm_90, runs ptxas on the PTX and asserts there are no register
spills, then prints "<name> ok".
"""

import os
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PRELUDE = textwrap.dedent(
    """
    import re, subprocess, tempfile
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    assert triton.__version__.startswith("3.8"), triton.__version__  # ASTSource/signature API is pinned

    def lower(fn, sig, constexprs, num_warps=4, name=None):
        assert len(sig) == len(fn.arg_names), (sig, fn.arg_names)
        c = triton.compile(ASTSource(fn, sig, constexprs), target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": num_warps})
        assert ".target sm_90" in c.asm["ptx"] and c.asm["cubin"]
        with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
            f.write(c.asm["ptx"]); f.flush()
            log = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name", "sm_90a", f.name, "-o", "/dev/null"],
                                 capture_output=True, text=True, check=True).stderr
        spills = [int(s) for s in re.findall(r"(\\d+) bytes spill stores", log)]
        assert spills and max(spills) == 0, log
        print(name or f"{fn.__name__} {constexprs}", "ok")
    """
)


def lower_in_subprocess(script: str) -> str:
    """Run PRELUDE + script in a fresh interpreter from the repo root; returns its stdout."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(script)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout
