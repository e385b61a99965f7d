"""Generated checkable tasks: problems with one right answer and a verifier.

They give the value head a reward with a right answer and the planner
something it can be measured on. Four kinds, each short enough for a small
byte-level model:

- ``add``: ``Q: 47+38=`` → ``85``
- ``sort``: ``Q: sort 5 2 9 4`` → ``2 4 5 9``
- ``reverse``: ``Q: reverse lamp`` → ``pmal``
- ``word``: ``Q: Ann has 7 apples and gets 5 more. How many apples?`` → ``12``

A problem is written ``Q: {question}\\nA: {answer}\\n\\n``; a model is asked
with ``Q: {question}\\nA: `` and its answer is the text up to the newline.
:func:`verify` recomputes the answer from the question text alone (it never
trusts a stored answer), so it also checks problems it did not generate.

Splits are fixed by a hash of the question, not by generation order: a
question is held out when ``sha256(question) % 100 < HELD_OUT_PERCENT``, so
no held-out question is ever trained on, whatever the seed or the count.

Public, and light (numpy only): the training stages (:mod:`engine.train`)
draw problems from it and the planner's verifiers (:mod:`planner.verifiers`)
check answers with it, so serving never loads training code.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import numpy as np

KINDS = ("add", "sort", "reverse", "word")
HELD_OUT_PERCENT = 10
LETTERS = "abcdefghijklmnopqrstuvwxyz"
NAMES = ("Ann", "Bob", "Cal", "Dee", "Eve", "Fox", "Gus", "Ivy")
THINGS = ("apples", "books", "coins", "cups", "pens", "stones")

# The question of each kind, as a pattern of its text (what :func:`solve` and :func:`kind_of` read).
QUESTIONS: dict[str, re.Pattern[str]] = {
    "add": re.compile(r"^(\d+)\+(\d+)=$"),
    "sort": re.compile(r"^sort((?: \d)+)$"),
    "reverse": re.compile(r"^reverse ([a-z]+)$"),
    "word": re.compile(r"^([A-Z][a-z]+) has (\d+) ([a-z]+) and (gets (\d+) more|gives away (\d+))\. How many \3\?$"),
}


@dataclass(frozen=True)
class Problem:
    kind: str
    question: str
    answer: str

    @property
    def prompt(self) -> str:
        return f"Q: {self.question}\nA: "

    @property
    def text(self) -> str:
        return f"{self.prompt}{self.answer}\n\n"


def solve(question: str) -> str | None:
    """The right answer to ``question``, computed from its text; None when it is not a task question."""
    if m := QUESTIONS["add"].match(question):
        return str(int(m[1]) + int(m[2]))
    if m := QUESTIONS["sort"].match(question):
        return " ".join(sorted(m[1].split()))
    if m := QUESTIONS["reverse"].match(question):
        return m[1][::-1]
    if m := QUESTIONS["word"].match(question):
        have = int(m[2])
        return str(have + int(m[5])) if m[5] is not None else str(have - int(m[6]))
    return None


def kind_of(question: str) -> str | None:
    """The kind of a task question (one of :data:`KINDS`), or None when it is not one."""
    for kind, pattern in QUESTIONS.items():
        if pattern.match(question):
            return kind
    return None


def answer_of(completion: str) -> str:
    """The answer a completion gives: its first line, stripped."""
    return completion.split("\n", 1)[0].strip()


def verify(question: str, completion: str) -> bool:
    """True when the first line of ``completion`` is the right answer to ``question``."""
    right = solve(question)
    return right is not None and answer_of(completion) == right


def held_out(question: str) -> bool:
    return int(hashlib.sha256(question.encode()).hexdigest(), 16) % 100 < HELD_OUT_PERCENT


def _question(kind: str, rng: np.random.Generator) -> str:
    if kind == "add":
        return f"{rng.integers(0, 100)}+{rng.integers(0, 100)}="
    if kind == "sort":
        return "sort " + " ".join(str(d) for d in rng.integers(0, 10, size=int(rng.integers(3, 6))))
    if kind == "reverse":
        return "reverse " + "".join(rng.choice(list(LETTERS), size=int(rng.integers(3, 7))))
    if kind == "word":
        name, thing = NAMES[rng.integers(len(NAMES))], THINGS[rng.integers(len(THINGS))]
        have = int(rng.integers(2, 20))
        if rng.random() < 0.5:
            return f"{name} has {have} {thing} and gets {rng.integers(1, 10)} more. How many {thing}?"
        return f"{name} has {have} {thing} and gives away {rng.integers(1, have)}. How many {thing}?"
    raise ValueError(f"unknown task kind {kind!r} (one of {', '.join(KINDS)})")


def problems(count: int, split: str, seed: int, kinds: tuple[str, ...] = KINDS) -> list[Problem]:
    """``count`` problems of ``split`` ("train" or "heldout"), kinds in turn, deterministic by ``seed``.

    Held-out problems are distinct questions (there are about 10^4 to 10^6 of
    each kind, so the held-out kinds are not exhausted by a few thousand).
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', not {split!r}")
    rng = np.random.default_rng(seed)
    want_held_out = split == "heldout"
    out: list[Problem] = []
    seen: set[str] = set()
    attempts = 0
    while len(out) < count:
        attempts += 1
        if attempts > 200 * count + 1000:
            raise RuntimeError(f"could not draw {count} distinct {split} problems")
        kind = kinds[len(out) % len(kinds)]
        q = _question(kind, rng)
        if held_out(q) != want_held_out or (want_held_out and q in seen):
            continue
        seen.add(q)
        out.append(Problem(kind, q, solve(q)))  # type: ignore[arg-type]
    return out


def corpus(num_bytes: int, seed: int) -> bytes:
    """Training problems written one after another, about ``num_bytes`` long (the backbone's task stream)."""
    parts: list[bytes] = []
    size = 0
    batch = 0
    while size < num_bytes:
        for p in problems(1000, "train", seed=seed * 1_000_003 + batch):
            b = p.text.encode()
            parts.append(b)
            size += len(b)
        batch += 1
    return b"".join(parts)[:num_bytes]
