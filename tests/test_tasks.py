"""The generated tasks: verifiers accept right answers and reject wrong ones; splits are fixed."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine import tasks


@pytest.mark.parametrize("kind", tasks.KINDS)
def test_generated_problems_verify_with_their_answer(kind):
    for p in tasks.problems(50, "train", seed=3, kinds=(kind,)):
        assert p.kind == kind and tasks.verify(p.question, p.answer)
        assert tasks.kind_of(p.question) == kind
        assert tasks.verify(p.question, p.answer + "\nQ: anything after the newline is not the answer")
        assert tasks.verify(p.question, f"  {p.answer}  ")


@pytest.mark.parametrize("text", ["", "47+38", "sort", "reverse Lamp", "Q: 47+38=", "hello"])
def test_a_text_that_is_no_task_question_has_no_kind(text):
    assert tasks.kind_of(text) is None and tasks.solve(text) is None


@pytest.mark.parametrize("question, right", [
    ("47+38=", "85"), ("0+0=", "0"), ("sort 5 2 9 4", "2 4 5 9"), ("sort 1 1 0", "0 1 1"),
    ("reverse lamp", "pmal"), ("Ann has 7 apples and gets 5 more. How many apples?", "12"),
    ("Bob has 9 pens and gives away 4. How many pens?", "5"),
])
def test_verifier_recomputes_the_answer_from_the_question(question, right):
    assert tasks.solve(question) == right
    assert tasks.verify(question, right)


@pytest.mark.parametrize("question, wrong", [
    ("47+38=", "84"), ("47+38=", "8 5"), ("47+38=", ""), ("sort 5 2 9 4", "2 4 9 5"), ("sort 5 2 9 4", "2 4 5"),
    ("reverse lamp", "lamp"), ("reverse lamp", "pma"),
    ("Ann has 7 apples and gets 5 more. How many apples?", "2"),
    ("Bob has 9 pens and gives away 4. How many pens?", "13"),
])
def test_verifier_rejects_wrong_answers(question, wrong):
    assert not tasks.verify(question, wrong)


@given(st.integers(0, 99), st.integers(0, 99), st.integers(-50, 50).filter(lambda d: d != 0))
def test_addition_off_by_anything_is_wrong(a, b, d):
    assert tasks.verify(f"{a}+{b}=", str(a + b)) and not tasks.verify(f"{a}+{b}=", str(a + b + d))


@given(st.text(max_size=40))
def test_text_that_is_not_a_task_never_verifies(question):
    if tasks.solve(question) is None:
        assert not tasks.verify(question, question)


def test_mismatched_word_problem_is_not_a_task():
    assert tasks.solve("Ann has 7 apples and gets 5 more. How many pens?") is None


def test_splits_are_disjoint_deterministic_and_distinct():
    held = tasks.problems(300, "heldout", seed=1)
    assert held == tasks.problems(300, "heldout", seed=1)
    assert len({p.question for p in held}) == 300 and all(tasks.held_out(p.question) for p in held)
    train = tasks.problems(300, "train", seed=1)
    assert not any(tasks.held_out(p.question) for p in train)
    assert {p.kind for p in held} == set(tasks.KINDS)


def test_corpus_is_problem_text_of_the_training_split():
    text = tasks.corpus(5000, seed=0).decode()
    blocks = [b for b in text.split("\n\n")[:-1] if b]
    assert len(text.encode()) == 5000 and len(blocks) > 50
    for block in blocks:
        q, a = block.split("\nA: ")
        assert tasks.verify(q.removeprefix("Q: "), a) and not tasks.held_out(q.removeprefix("Q: "))
