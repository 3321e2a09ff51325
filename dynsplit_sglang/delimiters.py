"""Which tokens may end a DynSplit block (the candidate delimiters DD-Select chooses among)."""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

# Prose punctuation, code structure and line breaks: the union of the separator sets used by
# SepLLM / SentenceKV plus code tokens. DD-Select decides which of them matter in a given context.
DELIMITER_CHARS = set(".,;:!?\n\t{}()[]<>\"'`|")


def is_delimiter_text(text: str) -> bool:
    return any(ch in DELIMITER_CHARS for ch in text)


def candidate_token_mask(tokenizer_path: str | None, vocab_size: int, mode: str) -> torch.Tensor:
    """[vocab_size] bool: True where a token may end a block.

    mode "all" (or no tokenizer available) lets every token end a block.
    """
    mask = torch.ones(vocab_size, dtype=torch.bool)
    if mode == "all":
        return mask
    if tokenizer_path is None:
        logger.warning("dynsplit: no tokenizer, so every token is a candidate delimiter")
        return mask
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer_path)
    except Exception as e:  # a dummy model without tokenizer files
        logger.warning("dynsplit: cannot load tokenizer %s (%s); every token is a candidate", tokenizer_path, e)
        return mask
    mask.zero_()
    n = min(vocab_size, len(tok))
    texts = tok.batch_decode([[i] for i in range(n)])
    for i, text in enumerate(texts):
        mask[i] = is_delimiter_text(text)
    return mask
