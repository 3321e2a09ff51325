"""GPU benchmarks: selection + FlashInfer sparse decode against FlashInfer full decode.

    python -m benchmarks.gpu.kernels        # one attention layer, Llama-3.1-8B shapes
    python -m benchmarks.gpu.decode_step    # a 32-layer Llama-3.1-8B-shaped decode step
    bash benchmarks/gpu/run_all.sh          # GPU tests, then both (the GPU box, no install)

`--smoke` runs either on tiny shapes on the CPU (torch selection reference, torch stand-in for
FlashInfer) so CI can check the scripts still run.
"""

# The GPU box runs from an uninstalled copy of the tree: map kernels/ to dynsplit_sglang.kernels.
from benchmarks.gpu import source_tree  # noqa: F401
