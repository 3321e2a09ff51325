"""Long-context tasks: seeded, reproducible prompt generators, no data hub, no download.

RULER-style tasks (after NVIDIA's RULER generators as shipped in `nvidia-long-context-eval`):
needle in a haystack with one key, several keys, several values or several queries; variable
tracking; common- and frequent-word extraction; question answering over SQuAD paragraphs. And
the scenarios the DynSplit-KV paper says split differently: source code (what a named function in
a long module returns) and structured records (a field of the record with a given id, as JSON
lines or as a markdown table).

Every generator builds its prompt from n haystack units (sentences, noise lines, words,
functions, records). `make_sample` picks the largest n whose chat-templated prompt, counted with
the model's own tokenizer, leaves room for the answer within the length target, so prompts end up
at most one unit short of `length - max_new_tokens`. Everything a prompt contains is drawn from
`random.Random(f"{task}/{length}/{seed}")` before n is used, so a sample depends only on
(task, length, seed, tokenizer), and the needle sits at the same relative depth whatever n is.

    from benchmarks.accuracy.tasks import TASKS, make_sample
    sample = make_sample(tokenizer, "niah_single", 4096, seed=0)
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Callable
from dataclasses import dataclass

from benchmarks.accuracy import data


@dataclass(frozen=True)
class Draft:
    """A generator's prompt for one haystack size.

    prompt:        the user message.
    answer_prefix: the start of the assistant's reply, which the model continues ("" for none).
    answers:       gold answers (see `Task.metric`).
    units:         haystack units used: fewer than asked when the source data ran out.
    """

    prompt: str
    answer_prefix: str
    answers: tuple[str, ...]
    units: int


@dataclass(frozen=True)
class Task:
    """One task of the suite.

    family:         what it measures, the panels of the plot: niah, multi-hop, aggregation, qa,
                    code, records.
    scenario:       what the context looks like, the axis of the split-rule ablation: prose
                    (essays, SQuAD), code, records, or synthetic (noise lines and word lists).
    metric:         "all": the score is the fraction of gold answers found in the output;
                    "part": 1 if any gold answer is found (SQuAD lists alternatives).
    max_new_tokens: tokens generated; the answers are short.
    draft:          (rng, n units, length target) -> Draft.
    """

    name: str
    family: str
    scenario: str
    metric: str
    max_new_tokens: int
    draft: Callable[[random.Random, int, int], Draft]


@dataclass(frozen=True)
class Sample:
    """One prompt of the suite.

    length:         the length setting in tokens: prompt plus max_new_tokens stay within it.
    messages:       OpenAI-style chat messages; a final assistant message is an answer prefix
                    that the model continues (`render` applies the chat template).
    answers:        gold answers, scored by `scoring.score` with the task's metric.
    num_tokens:     prompt tokens, chat template applied.
    """

    task: str
    family: str
    scenario: str
    length: int
    seed: int
    messages: tuple[dict, ...]
    answers: tuple[str, ...]
    metric: str
    max_new_tokens: int
    num_tokens: int


def render(tokenizer, messages) -> str:
    """The prompt text the engine gets: chat template applied, ending where the model writes.

    A base model (no chat template, e.g. Gemma-3-270M) gets the same text as a completion: the
    user's prompt, a blank line, then the answer prefix it continues (every task has one), after
    its BOS token (prompts are tokenized without special tokens; a chat template writes it)."""
    messages = list(messages)
    if not getattr(tokenizer, "chat_template", None):
        return (tokenizer.bos_token or "") + "\n\n".join(m["content"] for m in messages)
    if messages[-1]["role"] == "assistant":
        return tokenizer.apply_chat_template(messages, continue_final_message=True, tokenize=False)
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def count_tokens(tokenizer, messages) -> int:
    return len(tokenizer(render(tokenizer, messages), add_special_tokens=False).input_ids)


def make_sample(tokenizer, task: str, length: int, seed: int) -> Sample:
    """The prompt of `task` for this seed, as long as fits in `length` tokens with its answer."""
    t = TASKS[task]
    key = f"{task}/{length}/{seed}"

    def draft(n: int) -> Draft:
        return t.draft(random.Random(key), n, length)

    n = largest_fitting(lambda n: count_tokens(tokenizer, messages(draft(n))), length - t.max_new_tokens, MAX_UNITS)
    d = draft(n)
    if d.units < n:
        raise ValueError(f"{task}: its source data holds {d.units} haystack units, too few for {length} tokens")
    return Sample(
        task,
        t.family,
        t.scenario,
        length,
        seed,
        messages(d),
        d.answers,
        t.metric,
        t.max_new_tokens,
        count_tokens(tokenizer, messages(d)),
    )


def messages(draft: Draft) -> tuple[dict, ...]:
    """Chat messages of a draft: the user's prompt, then the answer prefix as the assistant's."""
    out = [{"role": "user", "content": draft.prompt}]
    if draft.answer_prefix:
        out.append({"role": "assistant", "content": draft.answer_prefix})
    return tuple(out)


def largest_fitting(count: Callable[[int], int], target: int, limit: int) -> int:
    """Largest n in [1, limit] with count(n) <= target, for a count that does not shrink as n
    grows: estimate n from the tokens per unit, bracket it, then bisect (about 10 counts)."""
    first = count(1)
    if first > target:
        raise ValueError(f"a length target of {target} tokens cannot hold one haystack unit ({first} tokens)")
    probe = min(limit, 17)
    per_unit = max(1e-9, (count(probe) - first) / max(1, probe - 1))
    n = max(1, min(limit, 1 + int((target - first) / per_unit)))
    step = max(1, n // 32)
    lo, hi = 1, limit + 1  # count(lo) <= target < count(hi); hi = limit + 1: never exceeded
    if count(n) <= target:
        lo = n
        while n < limit:
            n = min(limit, n + step)
            if count(n) > target:
                hi = n
                break
            lo, step = n, step * 2
    else:
        hi = n
        while n > 1:
            n = max(1, n - step)
            if count(n) <= target:
                lo = n
                break
            hi, step = n, step * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if count(mid) <= target:
            lo = mid
        else:
            hi = mid
    return lo


# ---------------------------------------------------------------------------------------------
# Shared pieces

MAX_UNITS = 100_000  # more haystack units than any length target up to 128k tokens needs

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


def _insert(haystack: list[str], items: list[str], depths: list[float]) -> list[str]:
    """`haystack` with items[i] inserted at relative depth depths[i] (0 = start, 1 = end); items
    at equal depth keep their order."""
    out = list(haystack)
    for _i, item, depth in sorted(zip(range(len(items)), items, depths), key=lambda t: (t[2], t[0]), reverse=True):
        out.insert(round(depth * len(haystack)), item)
    return out


def _number(rng: random.Random, digits: int = 7) -> str:
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def _unique(draw: Callable[[], str], k: int) -> list[str]:
    found: dict[str, None] = {}
    while len(found) < k:
        found.setdefault(draw())
    return list(found)


def _word_key(rng: random.Random) -> str:
    """An adjective-noun key such as "wakeful-otter" (RULER's needle keys)."""
    return f"{rng.choice(data.words('adjective'))}-{rng.choice(data.words('noun'))}"


def _essay(rng: random.Random) -> Callable[[int], list[str]]:
    """The first n sentences of the essays from a seeded starting sentence (wrapping around)."""
    sentences = data.essay_sentences()
    start = rng.randrange(len(sentences))
    return lambda n: [sentences[(start + i) % len(sentences)] for i in range(n)]


# ---------------------------------------------------------------------------------------------
# RULER-style tasks

NEEDLE = "One of the special magic numbers for {key} is: {value}."


def niah(num_keys: int, num_values: int, num_queries: int):
    """Needles "One of the special magic numbers for KEY is: VALUE." hidden among essay sentences;
    the question asks for all values of `num_queries` of the `num_keys` keys."""

    def draft(rng: random.Random, n: int, length: int) -> Draft:
        keys = _unique(lambda: _word_key(rng), num_keys)
        values = [_unique(lambda: _number(rng), num_values) for _ in keys]
        needles = [NEEDLE.format(key=k, value=v) for k, vs in zip(keys, values) for v in vs]
        rng.shuffle(needles)
        depths = [rng.random() for _ in needles]
        haystack = _essay(rng)
        queried = rng.sample(range(num_keys), num_queries)
        context = " ".join(_insert(haystack(n), needles, depths))
        query = ", ".join(keys[i] for i in queried[:-1]) + (", and " if num_queries > 1 else "") + keys[queried[-1]]
        answers = tuple(v for i in queried for v in values[i])
        if len(answers) == 1:
            prompt = (
                f"A special magic number is hidden within the following text. Make sure to memorize it. "
                f"I will quiz you about the number afterwards.\n{context}\n"
                f"What is the special magic number for {query} mentioned in the provided text?"
            )
            prefix = f"The special magic number for {query} mentioned in the provided text is"
        else:
            prompt = (
                f"Some special magic numbers are hidden within the following text. Make sure to memorize them. "
                f"I will quiz you about the numbers afterwards.\n{context}\n"
                f"What are all the special magic numbers for {query} mentioned in the provided text?"
            )
            prefix = f"The special magic numbers for {query} mentioned in the provided text are"
        return Draft(prompt, prefix, answers, n)

    return draft


def variable_tracking(num_hops: int = 4, example_lines: int = 5):
    """A chain "VAR A = 12345", "VAR B = VAR A", ... of num_hops + 1 variables among noise lines;
    the answer is every variable that holds the value. As in RULER, a solved example with its own
    chain among `example_lines` noise lines comes first. n = noise lines."""

    def text(names: list[str], value: str, depths: list[float], n: int) -> tuple[str, str]:
        chain = [f"VAR {names[0]} = {value}"] + [f"VAR {b} = VAR {a}" for a, b in zip(names, names[1:])]
        context = "\n".join(_insert([NOISE] * n, chain, depths))
        prompt = (
            "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
            f"{context}\nQuestion: Find all variables that are assigned the value {value} in the text above."
        )
        prefix = (
            f"Answer: According to the chain(s) of variable assignment in the text above, {len(names)} "
            f"variables are assigned the value {value}, they are:"
        )
        return prompt, prefix

    def draft(rng: random.Random, n: int, length: int) -> Draft:
        names = _unique(lambda: "".join(rng.choices(string.ascii_uppercase, k=5)), 2 * (num_hops + 1))
        example, names = names[: num_hops + 1], names[num_hops + 1 :]
        example_value, value = _unique(lambda: _number(rng, 5), 2)
        example_depths, depths = (sorted(rng.random() for _ in names) for _ in range(2))
        shown, shown_prefix = text(example, example_value, example_depths, example_lines)
        prompt, prefix = text(names, value, depths, n)
        prompt = f"{shown}\n{shown_prefix} {' '.join(example)}\n\n{prompt}"
        return Draft(prompt, prefix, tuple(names), n)

    return draft


def common_words(num_common: int = 10):
    """A numbered list of words where `num_common` words repeat more often than the rest; the
    answer is those words. As in RULER, the repeat counts are 6 vs 1 below 4096 tokens and 30 vs
    3 from 4096 on, and one small solved example precedes the list. n = distinct rare words."""

    def listing(words: list[str], rng: random.Random) -> str:
        rng.shuffle(words)
        return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))

    def draft(rng: random.Random, n: int, length: int) -> Draft:
        vocab = sorted(set(data.words("noun") + data.words("adjective") + data.words("verb")))
        rng.shuffle(vocab)
        example_common, vocab = vocab[:num_common], vocab[num_common:]
        example_rare, vocab = vocab[: 2 * num_common], vocab[2 * num_common :]
        common, rare = vocab[:num_common], vocab[num_common : num_common + n]
        often, rarely = (6, 1) if length < 4096 else (30, 3)
        question = "Question: What are the 10 most common words in the above list?"
        intro = (
            "Below is a numbered list of words. In these words, some appear more often than others. "
            "Memorize the ones that appear most often.\n"
        )
        example = (
            intro
            + listing(example_common * 3 + example_rare, rng)
            + "\n"
            + question
            + "\n"
            + "Answer: The top 10 words that appear most often in the list are: "
            + " ".join(f"{i + 1}. {w}" for i, w in enumerate(example_common))
        )
        prompt = example + "\n\n" + intro + listing(common * often + rare * rarely, rng) + "\n" + question
        return Draft(
            prompt, "Answer: The top 10 words that appear most often in the list are:", tuple(common), len(rare)
        )

    return draft


def frequent_words(alpha: float = 2.0, word_len: int = 6):
    """Coded words (random letters) whose counts follow a Zipf law with exponent alpha over a
    vocabulary of length/50 words; the top-ranked word is the noise "...". The answer is the
    three most frequent coded words. n = total words."""

    def draft(rng: random.Random, n: int, length: int) -> Draft:
        size = max(10, length // 50)
        vocab = _unique(lambda: "".join(rng.choices(string.ascii_lowercase, k=word_len)), size)
        vocab[0] = "..."
        weights = [k**-alpha for k in range(1, size + 1)]
        total = sum(weights)
        text = [w for w, p in zip(vocab, weights) for _ in range(int(n * p / total))]
        rng.shuffle(text)
        prompt = (
            "Read the following coded text and track the frequency of each coded word. Find the three "
            f"most frequently appeared coded words. {' '.join(text)}\nQuestion: Do not provide any "
            "explanation. Please ignore the dots '....'. What are the three most frequently appeared "
            "words in the above coded text?"
        )
        prefix = "Answer: According to the coded text above, the three most frequently appeared words are:"
        return Draft(prompt, prefix, tuple(vocab[1:4]), n)

    return draft


def squad_qa():
    """A SQuAD question; its paragraph is one of many documents, the others are paragraphs of the
    whole dev set in seeded order (the last one cut at a sentence end). n = distractor sentences."""

    def draft(rng: random.Random, n: int, length: int) -> Draft:
        questions, paragraphs = data.squad()
        qa = questions[rng.randrange(len(questions))]
        order = [i for i in range(len(paragraphs)) if i != qa.paragraph]
        rng.shuffle(order)
        depth = rng.random()
        docs, left = [], n
        for i in order:
            if left <= 0:
                break
            sentences = data.split_sentences(paragraphs[i])[:left]
            docs.append(" ".join(sentences))
            left -= len(sentences)
        docs = _insert(docs, [paragraphs[qa.paragraph]], [depth])
        context = "\n\n".join(f"Document {i + 1}:\n{d}" for i, d in enumerate(docs))
        instruction = (
            "Answer the question based on the given documents. "
            "Only give me the answer and do not output any other words."
        )
        prompt = (
            f"{instruction}\n\nThe following are given documents.\n\n{context}\n\n{instruction}\n\n"
            f"Question: {qa.question}"
        )
        return Draft(prompt, "Answer:", qa.answers, n - max(0, left))

    return draft


# ---------------------------------------------------------------------------------------------
# Scenario tasks: source code and structured records


def _function(rng: random.Random, name: str, result: str) -> str:
    """A plausible Python function that computes something from its arguments, then returns the
    literal `result`."""
    args = rng.sample(["items", "count", "limit", "offset", "scale", "data", "key", "width", "depth"], 2)
    acc = rng.choice(["total", "value", "acc", "result_id", "score", "state"])
    verb, noun = name.split("_")[0], name.split("_")[-1]
    body = [f"{acc} = {args[0]!s} if isinstance({args[0]}, int) else len({args[0]})"]
    for _ in range(rng.randint(1, 3)):
        kind = rng.randrange(3)
        a, b = rng.randint(2, 97), rng.randint(2, 97)
        if kind == 0:
            body.append(f"for i in range({a}):\n        {acc} = ({acc} * {b} + i) % {a * b + 1}")
        elif kind == 1:
            body.append(
                f"if {acc} > {a}:\n        {acc} -= {b}\n    else:\n"
                f"        {acc} += {args[1]} if isinstance({args[1]}, int) else {b}"
            )
        else:
            body.append(f"{acc} = max({acc}, {a}) // {b}")
    lines = "\n    ".join(body)
    return (
        f"def {name}({args[0]}, {args[1]}):\n"
        f'    """{verb.capitalize()} the {noun} and return its reference."""\n'
        f"    {lines}\n"
        f"    return {result}\n"
    )


def code_return():
    """A long Python module of generated functions, each ending in `return LITERAL` (a 7-digit
    number or a string); the question asks what one named function returns. n = functions."""

    def draft(rng: random.Random, n: int, length: int) -> Draft:
        depth = rng.random()
        stream = random.Random(rng.random())  # the functions, drawn in order: n + 1 extends n
        verbs, adjectives, nouns = data.words("verb"), data.words("adjective"), data.words("noun")
        names, results, functions = [], [], []
        while len(names) < n:
            name = f"{stream.choice(verbs)}_{stream.choice(adjectives)}_{stream.choice(nouns)}"
            if name in names:
                continue
            result = _number(stream) if stream.random() < 0.5 else f'"{_word_key(stream)}"'
            names.append(name)
            results.append(result)
            functions.append(_function(stream, name, result))
        asked = min(n - 1, int(depth * n))
        module = '"""Order processing helpers."""\n\nimport math\n\n\n' + "\n\n".join(functions)
        prompt = (
            "Below is a Python module. Read it carefully; I will ask you about one of its functions.\n\n"
            f"```python\n{module}```\n\nQuestion: What value does the function `{names[asked]}` return? "
            "Answer with the literal value only."
        )
        # The reply starts as the function's last line, so the model answers with a literal, not prose.
        return Draft(prompt, f"The last line of `{names[asked]}` is: return", (results[asked].strip('"'),), n)

    return draft


RECORD_FIELDS = ("id", "owner", "product", "code", "quantity", "price", "status")
ASKED_FIELDS = ("owner", "code", "price")
STATUSES = ("open", "paid", "shipped", "returned", "cancelled")


def _record(rng: random.Random, record_id: int) -> dict:
    return {
        "id": record_id,
        "owner": _word_key(rng),
        "product": rng.choice(data.words("noun")),
        "code": "".join(rng.choices(string.ascii_uppercase, k=2)) + "-" + _number(rng, 4),
        "quantity": rng.randint(1, 999),
        "price": f"{rng.randint(1, 9999)}.{rng.randint(0, 99):02d}",
        "status": rng.choice(STATUSES),
    }


def records(layout: str):
    """An order table of n records with unique 6-digit ids, as JSON lines (layout "jsonl") or a
    markdown table ("table"); the question asks one field of the record with a given id."""

    def draft(rng: random.Random, n: int, length: int) -> Draft:
        depth, field = rng.random(), rng.choice(ASKED_FIELDS)
        stream = random.Random(rng.random())  # the records, drawn in order: n + 1 extends n
        rows, ids = [], set()
        while len(rows) < n:
            record = _record(stream, stream.randint(100000, 999999))
            if record["id"] not in ids:
                ids.add(record["id"])
                rows.append(record)
        asked = rows[min(n - 1, int(depth * n))]
        if layout == "jsonl":
            body = "\n".join(json.dumps(r) for r in rows)
            intro = f"Below are {n} records of an order database, one JSON object per line."
        else:
            body = "\n".join(
                ["| " + " | ".join(RECORD_FIELDS) + " |", "|" + " --- |" * len(RECORD_FIELDS)]
                + ["| " + " | ".join(str(r[f]) for f in RECORD_FIELDS) + " |" for r in rows]
            )
            intro = f"Below is a table of {n} records of an order database."
        prompt = (
            f"{intro}\n\n{body}\n\nQuestion: What is the {field} of the record with id {asked['id']}? "
            "Answer with the value only."
        )
        return Draft(prompt, f"The {field} of the record with id {asked['id']} is", (str(asked[field]),), n)

    return draft


TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task("niah_single", "niah", "prose", "all", 16, niah(num_keys=1, num_values=1, num_queries=1)),
        Task("niah_multikey", "niah", "prose", "all", 16, niah(num_keys=4, num_values=1, num_queries=1)),
        Task("niah_multivalue", "niah", "prose", "all", 48, niah(num_keys=1, num_values=4, num_queries=1)),
        Task("niah_multiquery", "niah", "prose", "all", 48, niah(num_keys=4, num_values=1, num_queries=4)),
        Task("variable_tracking", "multi-hop", "synthetic", "all", 32, variable_tracking(num_hops=4)),
        Task("common_words", "aggregation", "synthetic", "all", 64, common_words(num_common=10)),
        Task("frequent_words", "aggregation", "synthetic", "all", 24, frequent_words(alpha=2.0)),
        Task("qa_squad", "qa", "prose", "part", 24, squad_qa()),
        Task("code_return", "code", "code", "all", 16, code_return()),
        Task("records_jsonl", "records", "records", "all", 24, records("jsonl")),
        Task("records_table", "records", "records", "all", 24, records("table")),
    ]
}
