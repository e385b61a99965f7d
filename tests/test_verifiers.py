"""The verifier registry: each named verifier accepts a right answer and rejects a wrong one; bad fields are refused."""

from __future__ import annotations

import time

import pytest
from pydantic import ValidationError

from engine import tasks
from engine.text.tokenizer import ByteTokenizer
from engine.thinking import PlanJob, ThinkParams
from planner.verifiers import VERIFIERS, VerifierError, answer_reward, compile_pattern, get_verifier, verdict
from server.schemas import ThinkOptions, ThinkRequest

TOK = ByteTokenizer()

# name -> (prompt, right answer, wrong answer[, pattern])
CASES = {
    "add": ("Q: 47+38=\nA: ", "85", "84"),
    "sort": ("Q: sort 5 2 9 4\nA: ", "2 4 5 9", "2 5 4 9"),
    "reverse": ("Q: reverse lamp\nA: ", "pmal", "lamp"),
    "word": ("Q: Ann has 7 apples and gets 5 more. How many apples?\nA: ", "12", "2"),
    "task": ("Q: Bob has 9 pens and gives away 4. How many pens?\nA: ", "5", "13"),
    "json": ("Give me an object: ", '{"a": [1, 2, null]}', '{"a": [1, 2,'),
    "regex": ("A date: ", "2026-11-30", "30/11/2026", r"\d{4}-\d{2}-\d{2}"),
}


def test_every_registered_verifier_is_covered():
    assert set(CASES) == set(VERIFIERS)


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_verifier_accepts_a_right_answer_and_rejects_a_wrong_one(name):
    prompt, right, wrong, *pattern = CASES[name]
    check = get_verifier(name, *pattern)
    assert check(prompt, right) is True
    assert check(prompt, wrong) is False


def test_task_verifiers_check_their_own_kind_and_recompute_the_answer():
    for problem in tasks.problems(40, "heldout", seed=3):
        assert get_verifier(problem.kind)(problem.prompt, problem.answer)
        assert get_verifier("task")(problem.prompt, problem.answer)
        other = next(k for k in tasks.KINDS if k != problem.kind)
        assert not get_verifier(other)(problem.prompt, problem.answer)
    assert not get_verifier("add")("no question here", "85")


def test_unknown_names_and_bad_patterns_raise_naming_the_field():
    with pytest.raises(VerifierError) as exc:
        get_verifier("nope")
    assert exc.value.field == "verifier"
    for bad in ("(", "a{99999999999}", "x" * 2000, ""):
        with pytest.raises(VerifierError) as exc:
            compile_pattern(bad)
        assert exc.value.field == "verifier_pattern"
    with pytest.raises(VerifierError) as exc:
        get_verifier("json", "a+")
    assert exc.value.field == "verifier_pattern"


def test_a_catastrophic_pattern_is_refused_or_bounded_in_time():
    pattern = r"(x+x+)+y"
    try:
        check = get_verifier("regex", pattern)
    except VerifierError as exc:
        assert exc.field == "verifier_pattern"
        return
    start = time.monotonic()
    assert check("", "x" * 5000) is False  # rejected within the match time limit, not after minutes
    assert time.monotonic() - start < 5.0


@pytest.mark.parametrize("body, field", [
    ({"verifier": "nope"}, "verifier"),
    ({"verifier": "regex"}, "verifier_pattern"),
    ({"verifier": "regex", "verifier_pattern": "("}, "verifier_pattern"),
    ({"delta": "sideways"}, "delta"),
    ({"verifier": "regex", "verifier_pattern": "\ud800"}, "verifier_pattern"),  # an unpaired surrogate
])
def test_the_schema_refuses_bad_verifier_fields_naming_them(body, field):
    for model, extra in ((ThinkOptions, {}), (ThinkRequest, {"prompt": "x"})):
        with pytest.raises(ValidationError) as exc:
            model.model_validate({**body, **extra})
        assert exc.value.errors()[0]["loc"][0] == field


def test_the_schema_passes_good_verifier_fields_to_the_engine_params():
    opts = ThinkOptions.model_validate({"verifier": "regex", "verifier_pattern": r"\d+"})
    params = ThinkParams(**opts.model_dump())
    assert (params.verifier, params.verifier_pattern, params.delta) == ("regex", r"\d+", "decision")
    # a pattern means nothing to the other verifiers: ignored, as the schema says
    assert ThinkOptions.model_validate({"verifier": "add", "verifier_pattern": "("}).verifier_pattern is None


def test_the_schema_states_the_verifier_names_and_the_pattern_rule():
    schema = ThinkOptions.model_json_schema()
    names = next(o for o in schema["properties"]["verifier"]["anyOf"] if "enum" in o)["enum"]
    assert set(names) == set(VERIFIERS)
    assert schema["then"] == {"required": ["verifier_pattern"]}


def test_answer_reward_scores_branches_that_end_the_answer():
    prompt = TOK.encode("Q: 47+38=\nA: ")
    params = ThinkParams(verifier="add")
    job = PlanJob("r", 0, None, None, prompt[-1:], params, prompt, 1, ("\n",))
    reward = answer_reward(job, TOK)
    first = prompt[-1]
    assert reward([first]) is None  # nothing answered yet
    assert reward([first, ord("8")]) is None  # the answer goes on
    assert reward([first, ord("8"), ord("5"), ord("\n")]) == 1.0
    assert reward([first, ord("8"), ord("4"), ord("\n")]) == -1.0
    assert reward([first, ord("8"), ord("5"), TOK.eos_id]) == 1.0
    later = PlanJob("r", 2, None, None, [first, ord("8"), ord("5")], params, prompt, 1, ("\n",))
    assert answer_reward(later, TOK)([ord("5"), ord("\n")]) == 1.0  # tokens before planned_at count
    assert answer_reward(PlanJob("r", 0, None, None, [first], ThinkParams(), prompt, 1, ()), TOK) is None


def test_verdict_on_a_final_answer():
    assert verdict("add", None, "Q: 47+38=\nA: ", "85") is True
    assert verdict("add", None, "Q: 47+38=\nA: ", "86") is False
    assert verdict(None, None, "Q: 47+38=\nA: ", "85") is None


@pytest.mark.parametrize("pattern", ["a{1000000000}", "(a{1000}){1000}", "x{,3000000}"])
def test_a_pattern_whose_counted_repeats_would_compile_to_gigabytes_is_refused(pattern):
    # a{3000000} alone took 750 MB to compile (the regex module writes counted repeats out)
    with pytest.raises(VerifierError) as err:
        compile_pattern(pattern)
    assert err.value.field == "verifier_pattern" and "repeats" in str(err.value)
    assert get_verifier("regex", r"\d{3}-\d{4}")("", "555-1234")  # ordinary counts still pass


def test_the_question_is_the_last_line_but_one_after_its_q():
    from planner.verifiers import question_of

    assert question_of("Q: 47+38=\nA: ") == "47+38=" and question_of("intro Q: 1+1=\nA:") == "1+1="
    assert question_of("Q: 1+1=\nB: ") is None and question_of("no question") is None
    assert question_of("Q: " * 11000) is None  # the regex search this replaced took a second here (quadratic)


def test_a_checker_that_fails_on_an_odd_answer_rejects_it():
    # int() refuses more than 4300 digits: the task checker raised, ending the stream and the planner's batch
    huge = "Q: " + "9" * 5000 + "+1=\nA: "
    for name in ("add", "task"):
        assert get_verifier(name)(huge, "1") is False
    assert verdict("add", None, huge, "1") is False
