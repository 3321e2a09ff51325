"""Passkey retrieval prompts (Landmark-attention style), seeded and reproducible, no data files.

A 5-digit key is hidden at a chosen depth of a long, repetitive filler; the model is asked for it
at the end. The benchmark and the long-prompt server test both use this one generator.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
INSTRUCTION = "There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
QUESTION = "What is the pass key? Answer with the number only."


@dataclass(frozen=True)
class PasskeySample:
    messages: list[dict]  # OpenAI chat messages
    answer: str
    depth: float
    num_tokens: int  # prompt tokens with the chat template applied


def make_sample(tokenizer, target_tokens: int, seed: int, depth: float | None = None) -> PasskeySample:
    """A chat prompt of about `target_tokens` tokens (chat template included) with the key at
    `depth` (0 = start, 1 = end; random in [0.05, 0.95] when None)."""
    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999))
    depth = rng.uniform(0.05, 0.95) if depth is None else depth
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "

    def build(n_filler: int) -> list[dict]:
        before = round(n_filler * depth)
        text = INSTRUCTION + FILLER * before + needle + FILLER * (n_filler - before) + "\n" + QUESTION
        return [{"role": "user", "content": text}]

    def count(messages) -> int:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return len(tokenizer(text, add_special_tokens=False).input_ids)

    base = count(build(0))
    per_filler = max(1, (count(build(10)) - base) // 10)
    n = max(1, (target_tokens - base) // per_filler)
    messages = build(n)
    return PasskeySample(messages, key, depth, count(messages))


def is_correct(sample: PasskeySample, output: str) -> bool:
    """The first 5-digit number in the answer is the key."""
    found = re.findall(r"\d{5}", output)
    return bool(found) and found[0] == sample.answer
