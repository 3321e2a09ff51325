"""Scoring of generated answers, as RULER does it (string match, case-insensitive).

    all:  the fraction of the gold answers that occur in the output (needles, variables, words);
    part: 1 if any gold answer occurs in the output, else 0 (QA, where the gold list holds the
          annotators' alternative answers; also every single-answer task).

A gold answer "occurs" when it is a substring of the output, ignoring case; a multi-answer task
therefore gets partial credit for each value it names.
"""

from __future__ import annotations


def found(answer: str, output: str) -> bool:
    return answer.lower() in output.lower()


def string_match_all(output: str, answers) -> float:
    """Fraction of `answers` found in `output`."""
    answers = list(answers)
    return sum(found(a, output) for a in answers) / len(answers)


def string_match_part(output: str, answers) -> float:
    """1.0 if any of `answers` is found in `output`, else 0.0."""
    return float(any(found(a, output) for a in answers))


METRICS = {"all": string_match_all, "part": string_match_part}


def score(sample, output: str) -> float:
    """Score in [0, 1] of `output` (the generated text only) for a `tasks.Sample`."""
    return METRICS[sample.metric](output, sample.answers)


def check(sample) -> None:
    """Assert the scorer on the sample's known answers: the gold answers score 1, an empty or
    unrelated answer 0, and (metric "all") each single gold answer its share."""
    gold = " ".join(sample.answers)
    assert score(sample, gold) == 1.0, (sample.task, sample.seed, "gold answers do not score 1")
    assert score(sample, "") == 0.0, (sample.task, sample.seed, "an empty answer scores above 0")
    if sample.metric == "all":
        distinct = len(set(a.lower() for a in sample.answers))
        for a in sample.answers:
            expected = sum(found(b, a) for b in sample.answers) / len(sample.answers)
            assert score(sample, a) == expected and (distinct == 1 or expected < 1), (sample.task, sample.seed, a)
