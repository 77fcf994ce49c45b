"""Long-context retrieval tests generated locally: Phonebook and needle-in-a-haystack (RULER style).

Phonebook (the SambaY paper's long-context retrieval test, in the format of its authors' code,
microsoft/ArchScale, after Jelassi et al. 2024, "Repeat After Me"): lines ``Name: phone`` (names from
`faker`, unique; ten-digit numbers whose first digit is 6-9) fill the context; two lines of the book are
repeated after a blank line as examples, and the prompt ends with the queried name and a colon::

    Joshua Wood: 6123456789
    …                                  ← the queried line sits at the stated depth of the book
    Karen Fowler: 8877001234

    Lori Jones: 7011223344
    Ryan Green: 9988776655

    Joshua Wood:

The answer is right when the first line of the greedy completion, stripped, is the number.

NIAH (RULER, Hsieh et al. 2024, ``niah_single_1`` / ``niah_multikey_1``): a haystack of RULER's noise
sentences ("The grass is green. The sky is blue. …") holds the needle "One of the special magic numbers
for {key} is: {value}." at the stated depth (at a sentence boundary); multi-key adds needles of other keys
at random depths as distractors. Keys are two `faker` words, values seven-digit numbers. The prompt ends
with RULER's answer prefix; the answer is right when the completion contains the value.

Every sample is a pure function of (task, target length, index, seed) and the tokenizer: its own
`random.Random` and `Faker` are seeded from a string of those, so a sample never depends on which others are
generated (Faker's word and name lists may change between Faker versions: results files record the version).
The prompt holds at most ``length`` tokens and as many as fit; depths are spread evenly over [0, 1] across
the samples of a length (0: the start of the context, 1: its end).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sambay.eval.batching import Finished, Job, run_jobs
from sambay.generate import Engine, SamplingParams
from sambay.tokenizer import Tokenizer

TASKS = ("phonebook", "niah_single", "niah_multikey")
NOISE = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
NIAH_INTRO = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
              "I will quiz you about the numbers afterwards.\n")
NIAH_QUESTION = ("\nWhat is the special magic number for {key} mentioned in the provided text? "
                 "The special magic number for {key} mentioned in the provided text is")


@dataclass(frozen=True)
class RetrievalSample:
    """One generated prompt, its answer, and where the needle was put."""

    task: str
    length: int  # the target context length (tokens); the prompt holds at most this many
    index: int  # among the samples of this length
    depth: float  # stated position of the needle: 0 = start of the context, 1 = end
    prompt: str
    answer: str
    needle: str  # the needle's text (a phonebook line, a NIAH sentence)
    needle_index: int  # its position among the context's units (lines / sentences)
    units: int  # lines / sentences in the context, the needle included
    prompt_tokens: int


def depth_of(index: int, samples: int) -> float:
    """Depths spread evenly: sample k of s sits at k / (s - 1) (0.5 when s = 1)."""
    return 0.5 if samples == 1 else index / (samples - 1)


def make_sample(task: str, tokenizer: Tokenizer, length: int, index: int, depth: float, seed: int | str,
                keys: int = 4) -> RetrievalSample:
    """One sample (module docstring); ``keys``: needles of a multi-key NIAH sample."""
    rng = random.Random(f"{task}:{seed}:{length}:{index}")
    fake = _faker(rng.getrandbits(63))
    if task == "phonebook":
        return _phonebook(tokenizer, length, index, depth, rng, fake)
    if task in ("niah_single", "niah_multikey"):
        return _niah(task, tokenizer, length, index, depth, rng, fake, 1 if task == "niah_single" else keys)
    raise ValueError(f"unknown retrieval task {task!r}; expected one of {', '.join(TASKS)}")


def make_samples(task: str, tokenizer: Tokenizer, lengths: Sequence[int], samples: int, seed: int,
                 keys: int = 4) -> list[RetrievalSample]:
    """``samples`` per length, depths spread evenly (`depth_of`)."""
    return [make_sample(task, tokenizer, length, k, depth_of(k, samples), seed, keys)
            for length in lengths for k in range(samples)]


def require_faker() -> type:
    """Faker's class; RuntimeError with the install command when the package is missing."""
    try:
        from faker import Faker
    except ImportError:
        raise RuntimeError("the retrieval tests need the faker package: pip install 'sambay[eval]'") from None
    return Faker


def _faker(seed: int):
    fake = require_faker()("en_US")
    fake.seed_instance(seed)
    return fake


def _phonebook(tokenizer: Tokenizer, length: int, index: int, depth: float, rng: random.Random,
               fake) -> RetrievalSample:
    seen: set[str] = set()

    def entry() -> str:
        name = fake.name()
        while name in seen:
            name = fake.name()
        seen.add(name)
        return f"{name}: {rng.randint(6, 9)}{rng.randrange(10**9):09d}"

    needle, examples = entry(), (entry(), entry())
    at = (rng.random(), rng.random())  # where the examples sit in the book, as fractions
    lines: list[str] = []  # the other entries, drawn as the fitting asks for more

    def render(k: int) -> tuple[str, int, int]:
        while len(lines) < k:
            lines.append(entry())
        book = lines[:k]
        for frac, line in sorted(zip(at, examples, strict=True)):
            book.insert(round(frac * len(book)), line)
        position = round(depth * len(book))
        book.insert(position, needle)
        name = needle.split(":")[0]
        return "\n".join(book) + f"\n\n{examples[0]}\n{examples[1]}\n\n{name}:", position, len(book)

    k = _fit(lambda k: render(k)[0], tokenizer, length, len(tokenizer.encode(needle + "\n")))
    prompt, position, units = render(k)
    return RetrievalSample("phonebook", length, index, depth, prompt, needle.split(": ")[1], needle, position, units,
                           len(tokenizer.encode(prompt)))


def _niah(task: str, tokenizer: Tokenizer, length: int, index: int, depth: float, rng: random.Random, fake,
          keys: int) -> RetrievalSample:
    names: list[str] = []
    while len(names) < keys:
        key = f"{fake.word()}-{fake.word()}"
        if key not in names:
            names.append(key)
    values = [str(rng.randint(1_000_000, 9_999_999)) for _ in names]
    needles = [f"One of the special magic numbers for {k} is: {v}." for k, v in zip(names, values, strict=True)]
    distractor_at = [rng.random() for _ in needles[1:]]

    def render(k: int) -> tuple[str, int, int]:
        sentences = [NOISE[i % len(NOISE)] for i in range(k)]
        for frac, needle in zip(distractor_at, needles[1:], strict=True):
            sentences.insert(round(frac * len(sentences)), needle)
        position = round(depth * len(sentences))
        sentences.insert(position, needles[0])
        context = " ".join(sentences)
        return NIAH_INTRO + context + NIAH_QUESTION.format(key=names[0]), position, len(sentences)

    per_sentence = max(len(tokenizer.encode(" " + " ".join(NOISE))) / len(NOISE), 1.0)
    k = _fit(lambda k: render(k)[0], tokenizer, length, per_sentence)
    prompt, position, units = render(k)
    return RetrievalSample(task, length, index, depth, prompt, values[0], needles[0], position, units,
                           len(tokenizer.encode(prompt)))


def _fit(render: Callable[[int], str], tokenizer: Tokenizer, length: int, per_unit: float) -> int:
    """The most filler units whose rendered prompt holds at most ``length`` tokens (found in a few encodes)."""
    def tokens(k: int) -> int:
        return len(tokenizer.encode(render(k)))

    base = tokens(0)
    if base > length:
        raise ValueError(f"a context of {length} tokens cannot hold even the question ({base} tokens)")
    k = int((length - base) / per_unit)
    for _ in range(8):  # Newton steps on a near-linear count
        step = math.floor((length - tokens(k)) / per_unit)
        if step == 0:
            break
        k = max(k + step, 0)
    while k > 0 and tokens(k) > length:
        k -= 1
    while tokens(k + 1) <= length:
        k += 1
    return k


def is_correct(task: str, answer: str, output: str) -> bool:
    """Phonebook: the first line of the output, stripped, is the number. NIAH: the output contains the value."""
    if task == "phonebook":
        return output.strip().split("\n")[0].strip() == answer
    return answer in output


def evaluate(engine: Engine, samples: Sequence[RetrievalSample], *, max_new_tokens: int, slots: int,
             on_record: Callable[[dict], None], on_step: Callable[[int], None] | None = None) -> None:
    """Greedy completions of the samples (plain text, no chat template), each graded and passed to ``on_record``
    as it finishes: ``{"task", "length", "index", "depth", "prompt_tokens", "answer", "output", "correct"}``."""
    stop = ("\n",) if any(s.task == "phonebook" for s in samples) else ()
    params = SamplingParams(temperature=0, max_new_tokens=max_new_tokens, stop=stop)
    by_key = {(s.task, s.length, s.index): s for s in samples}
    jobs = [Job(key, engine.encode(s.prompt), params) for key, s in by_key.items()]

    def finish(seq: Finished) -> None:
        s = by_key[seq.key]
        on_record({"task": s.task, "length": s.length, "index": s.index, "depth": s.depth,
                   "prompt_tokens": s.prompt_tokens, "answer": s.answer, "output": seq.text,
                   "correct": is_correct(s.task, s.answer, seq.text)})

    run_jobs(engine, jobs, finish, slots=slots, on_step=on_step)


def accuracy_by_length(records: Sequence[dict]) -> dict[int, dict]:
    """{length: {"accuracy", "samples", "mean_prompt_tokens"}}, lengths ascending."""
    groups: dict[int, list[dict]] = {}
    for r in records:
        groups.setdefault(r["length"], []).append(r)
    return {length: {"accuracy": sum(r["correct"] for r in rs) / len(rs), "samples": len(rs),
                     "mean_prompt_tokens": sum(r["prompt_tokens"] for r in rs) / len(rs)}
            for length, rs in sorted(groups.items())}


def training_documents(task: str, tokenizer: Tokenizer, lengths: Sequence[int], count: int, seed: int,
                       keys: int = 4, queries: int = 0) -> list[str]:
    """``count`` finished samples (prompt, then the answer) for training, lengths taken in turn, random depths.

    They come from a stream of their own ("train:" in the seed), so the same ``seed`` never reproduces an
    evaluation sample. The trainer packs documents back to back into windows of ``seq_len`` tokens, so a
    window edge cuts a document of L tokens apart with probability about L / seq_len, and then its question
    is trained without its book: keep the lengths well under ``seq_len``.

    ``queries`` (phonebook): that many more lookups after the answer, each another line of the book (name and
    number, in the evaluation's ``Name: number`` form), so one book trains several retrievals instead of the
    question's one (and the examples' two). The book is generated shorter to make room (down to half the length
    or 256 tokens), and a lookup is added only while the document stays within its length; the question and
    its answer alone may pass it by a few tokens, as without lookups.
    """
    if queries < 0:
        raise ValueError(f"queries must be >= 0, got {queries}")
    if queries and task != "phonebook":
        raise ValueError(f"queries: only the phonebook task has more lookups to add, not {task!r}")
    docs = []
    for i in range(count):
        length = lengths[i % len(lengths)]
        depth = random.Random(f"train-depth:{seed}:{i}").random()
        if not queries:
            s = make_sample(task, tokenizer, length, i, depth, f"train:{seed}", keys)
            docs.append(s.prompt + " " + s.answer + ("\n" if task == "phonebook" else "."))
            continue
        line = len(tokenizer.encode("Jonathan Richardson: 6123456789\n"))  # a long-ish book line
        book_length = max(length - queries * line, length // 2, min(length, 256))  # lookups: at most half
        s = make_sample(task, tokenizer, book_length, i, depth, f"train:{seed}", keys)
        doc = s.prompt + " " + s.answer + "\n"
        book = s.prompt.split("\n\n", 1)[0].split("\n")
        picked = random.Random(f"train-queries:{seed}:{i}").sample(book, min(queries, len(book)))
        while picked and len(tokenizer.encode(doc + "\n".join(picked) + "\n")) > length:
            picked.pop()
        docs.append(doc + "".join(f"{q}\n" for q in picked))
    return docs
