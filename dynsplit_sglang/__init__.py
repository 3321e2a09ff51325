"""dynsplit-sglang: DynSplit-KV (dynamic semantic splitting of the KV cache) inside SGLang."""

__version__ = "0.1.0"
