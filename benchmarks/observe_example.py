"""What an operator sees of compression: one request's meta_info, the /metrics lines, /server_info.

    python -m benchmarks.observe_example            # SmolLM2-135M, CPU, --kv dynsplit --kv-budget 512

Starts a `--kv dynsplit --enable-metrics` server, sends one ~2,000-token passkey prompt through the
OpenAI chat API with SGLang's `return_meta_info`, and prints its `kv_compression` figures, the
`sglang:kv_compression_*` lines of /metrics (histogram buckets left out) and the `kv` entry of
/server_info: the README's "Operating it" example.
"""

from __future__ import annotations

import argparse
import json

import requests
from transformers import AutoTokenizer

from benchmarks.common import git_commit
from dynsplit_sglang.default_model import smollm2_path
from dynsplit_sglang.passkey import make_sample
from dynsplit_sglang.testing.server import launch_server


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kv-budget", type=int, default=512)
    p.add_argument("--prompt-tokens", type=int, default=2048)
    p.add_argument("--max-tokens", type=int, default=16)
    args = p.parse_args(argv)

    model = str(smollm2_path())
    sample = make_sample(AutoTokenizer.from_pretrained(model), args.prompt_tokens, 1, None)
    flags = ("--kv", "dynsplit", "--kv-budget", str(args.kv_budget), "--enable-metrics")
    with launch_server(model, *flags) as url:
        body = {
            "model": "default",
            "messages": sample.messages,
            "max_tokens": args.max_tokens,
            "temperature": 0,
            "return_meta_info": True,
        }
        reply = requests.post(url + "/v1/chat/completions", json=body, timeout=600).json()
        metrics = requests.get(url + "/metrics", timeout=30).text
        state = requests.get(url + "/server_info", timeout=30).json()["internal_states"][0]["kv"]
    print(f"# commit {git_commit()}; usage {json.dumps(reply['usage'])}")
    print(json.dumps(reply["choices"][0]["meta_info"]["kv_compression"]))
    for line in metrics.splitlines():
        if line.startswith("sglang:kv_compression_") and "_bucket" not in line:
            print(line)
    print(json.dumps({k: state[k] for k in ("policy", "budget", "evicted_requests", "evicted_tokens")}))


if __name__ == "__main__":
    main()
