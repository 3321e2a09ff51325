"""Compute kernels of dynsplit-sglang (installed as `dynsplit_sglang.kernels`).

Each op here is the pure-torch reference the CPU path runs; the GPU fast path adds Triton
versions with the same signatures next to them and is tested against these.
"""
