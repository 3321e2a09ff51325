"""Why the CPU server runs in fp32: time of one SmolLM2-shaped MLP matmul in fp32 and bf16.

python -m benchmarks.cpu_dtype
"""

from __future__ import annotations

import json
import os
import time

import torch

from benchmarks.common import RESULTS, run_info


def matmul_ms(dtype: torch.dtype, tokens: int = 2048, hidden: int = 576, inter: int = 1536, reps: int = 10) -> float:
    x, w = torch.randn(tokens, hidden, dtype=dtype), torch.randn(inter, hidden, dtype=dtype)
    torch.nn.functional.linear(x, w)
    t = time.perf_counter()
    for _ in range(reps):
        torch.nn.functional.linear(x, w)
    return 1000 * (time.perf_counter() - t) / reps


def main():
    rows = {str(dt).removeprefix("torch."): round(matmul_ms(dt), 2) for dt in (torch.float32, torch.bfloat16)}
    result = {**run_info(), "shape": "[2048 x 576] @ [576 x 1536]", "ms": rows, "threads": torch.get_num_threads()}
    with open(os.path.join(RESULTS, "cpu_dtype.json"), "w") as f:
        json.dump(result, f, indent=1)
    print("| dtype | ms |\n| --- | --- |\n" + "\n".join(f"| {k} | {v} |" for k, v in rows.items()))
    print(f"\n{result['device']}; commit {result['commit']}; {result['date']}")


if __name__ == "__main__":
    main()
