"""Token classes the policies need: DynSplit's candidate delimiters, SepLLM's separators."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

logger = logging.getLogger(__name__)

# Prose punctuation, code structure and line breaks: the union of the separator sets used by
# SepLLM / SentenceKV plus code tokens. DD-Select decides which of them matter in a given context.
DELIMITER_CHARS = set(".,;:!?\n\t{}()[]<>\"'`|")
# SepLLM's separators: `. , ? ! ; :`, space, tab and line break.
SEPARATOR_CHARS = set(".,?!;:")


def is_delimiter_text(text: str, chars=DELIMITER_CHARS) -> bool:
    return any(ch in chars for ch in text)


def is_separator_text(text: str) -> bool:
    """A token that is only separators: punctuation of SEPARATOR_CHARS and/or whitespace
    (a word with a leading space, as BPE vocabularies write most words, is not one)."""
    return text != "" and all(ch in SEPARATOR_CHARS or ch.isspace() for ch in text)


class TokenTexts:
    """The decoded text of every token id, loaded once, for policies that classify tokens."""

    def __init__(self, tokenizer_path: str | None, vocab_size: int):
        self.vocab_size = vocab_size
        self.texts: list[str] | None = None
        if tokenizer_path is None:
            return
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(tokenizer_path)
        except Exception as e:  # a dummy model without tokenizer files
            logger.warning("cannot load tokenizer %s (%s); token classes are unavailable", tokenizer_path, e)
            return
        n = min(vocab_size, len(tok))
        self.texts = tok.batch_decode([[i] for i in range(n)])

    def mask(self, predicate: Callable[[str], bool]) -> torch.Tensor | None:
        """[vocab_size] bool, True where predicate(text) holds; None without a tokenizer."""
        if self.texts is None:
            return None
        mask = torch.zeros(self.vocab_size, dtype=torch.bool)
        mask[: len(self.texts)] = torch.tensor([predicate(t) for t in self.texts], dtype=torch.bool)
        return mask


def candidate_token_mask(
    tokens: TokenTexts | None, mode: str, vocab_size: int, chars: str | None = None
) -> torch.Tensor:
    """[vocab_size] bool: True where a token may end a DynSplit block: its text holds one of
    `chars` (None: DELIMITER_CHARS).

    mode "all" (or no tokenizer available) lets every token end a block.
    """
    chars = DELIMITER_CHARS if chars is None else set(chars)
    mask = None if mode == "all" or tokens is None else tokens.mask(lambda t: is_delimiter_text(t, chars))
    if mask is None:
        if mode != "all":
            logger.warning("dynsplit: no tokenizer, so every token is a candidate delimiter")
        return torch.ones(vocab_size, dtype=torch.bool)
    return mask
