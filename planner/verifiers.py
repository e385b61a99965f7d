"""Named verifiers: checkers a search can use as its reward where a branch ends the answer.

A verifier gets the prompt text and the answer text (what was generated up
to, not including, the stop string or EOS that ended it) and says whether
the answer is right. ``think: {"verifier": NAME}`` makes the search score a
branch that reaches the end of the answer +1 (accepted) or -1 (rejected)
instead of asking the value head; the engine asks for the verdict on the
final answer as the request ends (:func:`judge`, through its planner link)
and the final event carries it in ``usage.think``.

- ``add``, ``sort``, ``reverse``, ``word``: the training tasks'
  (:mod:`engine.tasks`); the question is the prompt's last
  ``Q: ...`` line, and the answer is recomputed from it (never trusted);
  ``task`` accepts any of the four.
- ``json``: the answer (stripped) parses as JSON.
- ``regex``: the answer fully matches ``verifier_pattern`` (the ``regex``
  module, with a time limit per match, so a catastrophic pattern costs a
  bounded time and counts as a rejection; patterns and answers are bounded
  in size).

:func:`get_verifier` is the one registry look-up (the server checks a
request's fields through it, so an unknown name or a bad pattern is a 400
naming the field); :func:`answer_reward` turns a plan job into the search's
terminal reward.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

import regex

from engine import tasks
from engine.text.tokenizer import Tokenizer
from engine.thinking import PlanJob, ThinkParams

MAX_PATTERN_CHARS = 1000
MAX_ANSWER_CHARS = 65536
MATCH_TIMEOUT_S = 0.01  # per match: a search may call a verifier hundreds of times per plan
MAX_REPEAT_PRODUCT = 100_000  # counted repeats multiplied together: the regex module writes them out when compiling

Verifier = Callable[[str, str], bool]  # (prompt text, answer text) -> right?

_COUNTED_REPEAT = re.compile(r"\{(\d*)(?:,(\d*))?\}")


class VerifierError(ValueError):
    """A request's verifier fields are unusable; ``field`` names the one at fault."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def question_of(prompt: str) -> str | None:
    """The task question a prompt ends with (``...Q: {question}\\nA: ``), or None.

    Two string scans from the end, linear in the prompt (a regex search for ``Q: `` was quadratic on a prompt of
    repeated ``Q: `` without the ending: a second per call at 32k characters, on the event loop).
    """
    head, newline, last = prompt.rpartition("\n")
    if not newline or last not in ("A:", "A: "):
        return None
    line = head.rpartition("\n")[2]
    start = line.find("Q: ")
    return line[start + 3 :] if start >= 0 else None


def _task(kind: str | None) -> Verifier:
    def check(prompt: str, answer: str) -> bool:
        question = question_of(prompt)
        if question is None or (kind is not None and tasks.kind_of(question) != kind):
            return False
        return tasks.verify(question, answer)

    return check


def _json(prompt: str, answer: str) -> bool:
    if len(answer) > MAX_ANSWER_CHARS:
        return False
    try:
        json.loads(answer)
    except (ValueError, RecursionError):
        return False
    return True


def compile_pattern(pattern: str | None) -> regex.Pattern:
    """A bounded pattern, or :class:`VerifierError` naming ``verifier_pattern``."""
    if not pattern:
        raise VerifierError("verifier_pattern", "the regex verifier needs a non-empty verifier_pattern")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise VerifierError("verifier_pattern", f"verifier_pattern is longer than {MAX_PATTERN_CHARS} characters")
    if repeat_product(pattern) > MAX_REPEAT_PRODUCT:  # a{3000000} alone compiles to 750 MB
        raise VerifierError("verifier_pattern", f"verifier_pattern's counted repeats ({{m,n}}) multiply to more than "
                                                f"{MAX_REPEAT_PRODUCT:,}")
    try:  # not kept in the module's cache: a request's pattern lives as long as the request
        compiled = regex.compile(pattern, flags=regex.V0, cache_pattern=False)
    except (regex.error, OverflowError, RecursionError, MemoryError) as exc:
        raise VerifierError("verifier_pattern", f"verifier_pattern does not compile: {exc}") from None
    try:  # a pattern that cannot answer a short probe in time is refused up front
        compiled.fullmatch("a" * 32 + "!", timeout=0.05)
    except TimeoutError:
        raise VerifierError("verifier_pattern", "verifier_pattern takes too long to match "
                                                "(catastrophic backtracking)") from None
    return compiled


def repeat_product(pattern: str) -> int:
    """The product of every counted repeat's largest count in ``pattern`` (an upper bound on nested expansion)."""
    product = 1
    for low, high in _COUNTED_REPEAT.findall(pattern):
        count = high or low or "1"
        product *= 10**12 if len(count) > 12 else max(1, int(count))
    return product


def _regex(pattern: str | None) -> Verifier:
    compiled = compile_pattern(pattern)

    def check(prompt: str, answer: str) -> bool:
        if len(answer) > MAX_ANSWER_CHARS:
            return False
        try:
            return compiled.fullmatch(answer, timeout=MATCH_TIMEOUT_S) is not None
        except TimeoutError:
            return False

    return check


def _of_kind(kind: str) -> Callable[[str | None], Verifier]:
    return lambda pattern: _task(kind)


VERIFIERS: dict[str, Callable[[str | None], Verifier]] = {
    **{kind: _of_kind(kind) for kind in tasks.KINDS},
    "task": lambda pattern: _task(None),
    "json": lambda pattern: _json,
    "regex": _regex,
}


def get_verifier(name: str, pattern: str | None = None) -> Verifier:
    """The verifier ``name`` (with its pattern); :class:`VerifierError` for an unknown name or a bad pattern."""
    factory = VERIFIERS.get(name)
    if factory is None:
        raise VerifierError("verifier", f"unknown verifier {name!r} (one of {', '.join(sorted(VERIFIERS))})")
    if pattern is not None and name != "regex":
        raise VerifierError("verifier_pattern", "verifier_pattern is only for the regex verifier")
    return _never_raises(factory(pattern))


def _never_raises(verifier: Verifier) -> Verifier:
    """A checker that fails on an odd answer (a 5,000-digit number, say) rejects it: one request's answer must
    never end its stream or the planner batch it shares with others."""
    def check(prompt: str, answer: str) -> bool:
        try:
            return bool(verifier(prompt, answer))
        except Exception:  # noqa: BLE001 - any failure of a checker is a rejection
            return False

    return check


def answer_end(text: str, stop: tuple[str, ...] | list[str]) -> int | None:
    """Where the first stop string starts in ``text`` (the answer ends there), or None."""
    ends = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return min(ends) if ends else None


def answer_reward(job: PlanJob, tokenizer: Tokenizer) -> Callable[[list[int]], float | None] | None:
    """For a job whose request names a verifier: ``reward(key)`` for a node's tokens from ``planned_at``.

    +1 when the branch ends the answer (EOS, or a stop string of the request)
    and the verifier accepts it, -1 when it ends it and is rejected, None
    while the answer goes on (the value head scores those). None without a verifier.
    """
    name = job.params.verifier
    if name is None:
        return None
    try:
        verifier = get_verifier(name, job.params.verifier_pattern)
    except VerifierError:
        return None
    prompt = tokenizer.decode(job.prompt)
    before = job.tokens[:job.planned_at]
    eos = getattr(tokenizer, "eos_id", None)

    def reward(key: list[int]) -> float | None:
        answer_ids = (before + list(key))[job.answer_start:]
        if not answer_ids:
            return None
        ended = eos is not None and answer_ids[-1] == eos
        if ended:
            answer_ids = answer_ids[:-1]
        text = tokenizer.decode(answer_ids)
        end = answer_end(text, job.stop)
        if end is None and not ended:
            return None
        return 1.0 if verifier(prompt, text if end is None else text[:end]) else -1.0

    return reward


def verdict(name: str | None, pattern: str | None, prompt: str, answer: str) -> bool | None:
    """The verifier's verdict on a final answer (None without a verifier)."""
    if name is None:
        return None
    try:
        return get_verifier(name, pattern)(prompt, answer)
    except VerifierError:
        return None


def judge(params: ThinkParams, prompt: str, answer: str) -> bool | None:
    """:meth:`engine.thinking.PlannerLink.judge`: the request's verifier on its final answer (every planner link
    of this package answers with it)."""
    return verdict(params.verifier, params.verifier_pattern, prompt, answer)
