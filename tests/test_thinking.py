"""Gated injection and the engine's side of thinking: gating math, bounds, lag, staleness, divergence."""

from __future__ import annotations

import asyncio
import re
import threading

import pytest
import torch

from engine.loop.injection import effective_rate, inject
from engine.loop.scheduler import Engine
from engine.models.planner_net import PlannerNet
from engine.requests import FinishEvent, GenerationRequest, TokenEvent
from engine.sampling import SamplingParams
from engine.text.tokenizer import ByteTokenizer
from engine.thinking import PlanJob, StateDelta, ThinkParams, ThoughtEvent
from planner.planner import Planner
from planner.simulators import BackboneSimulator
from planner.verifiers import judge
from tests.conftest import make_model

TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def model():
    return make_model(seed=5, vocab_size=TOK.vocab_size)


class ThreadLink:
    """A planner link that runs a real :class:`Planner` (or a given function) on a thread, one job at a time."""

    def __init__(self, answer):
        self.answer = answer
        self.deliver = None
        self.jobs: list[PlanJob] = []
        self.discarded: list = []

    def submit(self, job: PlanJob) -> None:
        self.jobs.append(job)
        threading.Thread(target=lambda: self.deliver(self.answer(job)), daemon=True).start()

    def connect(self, deliver) -> None:
        self.deliver = deliver

    def discard(self, request_id) -> None:
        self.discarded.append(request_id)

    judge = staticmethod(judge)


def planner_answer(model, seed=0):
    torch.manual_seed(seed)
    planner = Planner(BackboneSimulator(model, PlannerNet.for_backbone(model)))
    lock = threading.Lock()

    def answer(job):
        with lock:
            return planner.run([job])[0]

    return answer


def generate(model, link, think: ThinkParams | None, n=40, prompt=b"The planner ", temperature=0.0, seed=None):
    async def main():
        engine = Engine(model, TOK)
        if link is not None:
            engine.attach_planner(link)
        engine.start()
        await asyncio.to_thread(engine.wait_ready, 60)
        try:
            handle = engine.submit(GenerationRequest(list(prompt), SamplingParams(temperature=temperature, seed=seed,
                                                                                  logprobs=0),
                                                     max_tokens=n, ignore_eos=True, think=think))
            return [e async for e in handle.events()]
        finally:
            engine.shutdown()

    events = asyncio.run(main())
    tokens = [e for e in events if isinstance(e, TokenEvent)]
    thoughts = [e for e in events if isinstance(e, ThoughtEvent)]
    return tokens, thoughts, events[-1]


def test_gate_is_zero_below_min_confidence_and_for_nonsense():
    p = ThinkParams(injection_rate=0.5, min_confidence=0.3, decay=0.5)
    assert effective_rate(0.29, p, 0) == 0.0
    assert effective_rate(float("nan"), p, 0) == 0.0
    assert effective_rate(0.8, p, 0) == pytest.approx(0.4)
    assert effective_rate(0.8, p, 2) == pytest.approx(0.1)
    assert effective_rate(7.0, p, 0) == pytest.approx(0.5)  # confidence is capped at 1


def test_injection_changes_exactly_what_the_next_step_reads(model):
    with torch.inference_mode():
        _, state = model.prefill(torch.tensor([list(b"hello world")]))
        plain = state.clone()
        change = torch.randn_like(state.ssm[:, 0])
        result = inject(state.ssm[:, 0], change, a_eff=0.5, trust_region=0.5)
        assert result.result == "applied" and result.delta_norm > 0
        token = torch.tensor([5])
        assert not torch.allclose(model.step(token, state), model.step(token, plain.clone()))
        # a_eff = 0 touches nothing
        same = plain.clone()
        assert inject(same.ssm[:, 0], change, a_eff=0.0, trust_region=0.5).result == "gated"
        assert torch.equal(same.ssm, plain.ssm)


def test_ten_thousand_adversarial_injections_keep_the_state_finite_and_bounded():
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(3, 16, 8, generator=gen)
    max_norm = 1e3
    kinds = [lambda: torch.full_like(h, 1e30), lambda: torch.full_like(h, float("nan")),
             lambda: torch.full_like(h, float("inf")), lambda: -torch.full_like(h, float("inf")),
             lambda: torch.randn(h.shape, generator=gen) * 1e6, lambda: torch.randn(h.shape, generator=gen),
             lambda: torch.zeros_like(h).index_fill_(0, torch.tensor([1]), float("nan"))]
    results = set()
    for i in range(10_000):
        change = kinds[i % len(kinds)]()
        a = [0.0, 0.3, 1.0, 5.0, float("nan")][i % 5]
        results.add(inject(h, change, a, trust_region=2.0, max_norm=max_norm).result)
        assert bool(torch.isfinite(h).all())
        assert float(h.reshape(3, -1).norm(dim=1).max()) <= max_norm * (1 + 1e-4)
    assert results == {"applied", "gated", "rejected"}


def test_zero_rate_thinking_gives_bit_identical_tokens(model):
    plain, _, _ = generate(model, None, None, temperature=0.8, seed=3)
    link = ThreadLink(planner_answer(model))
    think = ThinkParams(injection_rate=0.0, min_confidence=0.0, plan_every=3, deliberation_lag=1, simulations=8)
    thinking, thoughts, final = generate(model, link, think, temperature=0.8, seed=3)
    assert [t.token_id for t in thinking] == [t.token_id for t in plain]
    assert [t.logprob for t in thinking] == [t.logprob for t in plain]
    assert link.jobs and thoughts and all(t.outcome != "applied" for t in thoughts)
    assert final.usage.think.plans == len(link.jobs)


@pytest.mark.parametrize("lag", [0, 3])
def test_in_deterministic_mode_a_delta_lands_exactly_at_planned_at_plus_lag(model, lag):
    link = ThreadLink(planner_answer(model))
    think = ThinkParams(plan_every=5, deliberation_lag=lag, simulations=8, wait=True, time_budget_ms=5000)
    _, thoughts, _ = generate(model, link, think)
    assert len(thoughts) == len(link.jobs) >= 7
    assert all(t.applied_at - t.planned_at == lag for t in thoughts)


def test_applied_deltas_change_the_next_logits(model):
    plain, _, _ = generate(model, None, None)
    link = ThreadLink(planner_answer(model))
    think = ThinkParams(injection_rate=1.0, min_confidence=0.0, plan_every=5, deliberation_lag=1, simulations=16,
                        time_budget_ms=5000)
    tokens, thoughts, final = generate(model, link, think)
    applied = [t for t in thoughts if t.outcome == "applied"]
    assert applied and all(t.a_eff > 0 and t.delta_norm > 0 for t in applied)
    first = applied[0].applied_at  # the step that chose token `first` read the changed state
    logprobs, plain_logprobs = [t.logprob for t in tokens], [t.logprob for t in plain]
    assert logprobs[:first] == pytest.approx(plain_logprobs[:first], abs=1e-4)  # the held token: a step, not prefill
    assert logprobs[first] != pytest.approx(plain_logprobs[first], abs=1e-3)
    assert link.discarded  # the sequence ended: the planner was told to forget it
    assert final.usage.think.outcomes["applied"] == len(applied)


def test_a_delta_older_than_max_staleness_is_dropped_as_stale(model):
    link = ThreadLink(planner_answer(model))
    think = ThinkParams(injection_rate=1.0, min_confidence=0.0, plan_every=100, deliberation_lag=5, max_staleness=2,
                        simulations=8, time_budget_ms=5000)
    _, thoughts, _ = generate(model, link, think, n=12)
    assert [t.outcome for t in thoughts] == ["stale"]


def test_a_delta_for_another_path_is_dropped_as_diverged(model):
    def off_path(job: PlanJob) -> StateDelta:
        other = (job.tokens[job.planned_at], (job.tokens[job.planned_at] + 1) % 256)  # a move the session won't play
        change = torch.ones(1, *job.state.ssm.shape[:1], *job.state.ssm.shape[2:])
        return StateDelta(job.request_id, job.planned_at, job.apply_at, list(other), {other[:1]: 0}, change, [1.0],
                          frozenset({other[:1], other}), frozenset({other[:1]}))

    plain, _, _ = generate(model, None, None, n=10)
    link = ThreadLink(off_path)
    think = ThinkParams(injection_rate=1.0, min_confidence=0.0, plan_every=100, deliberation_lag=1)
    tokens, thoughts, _ = generate(model, link, think, n=10)
    assert [t.outcome for t in thoughts] == ["diverged"]
    # nothing landed: the same tokens; a thinking request's first token comes from a decode step, a plain one's from
    # the prefill, which agree to float32 rounding (exactly with the eager path, to ~1e-7 with the fused kernels)
    assert [t.token_id for t in tokens] == [t.token_id for t in plain]
    assert [t.logprob for t in tokens] == pytest.approx([t.logprob for t in plain], abs=1e-5)


def test_a_failed_plan_never_stops_a_waiting_sequence(model):
    from engine.thinking import PlanDropped

    link = ThreadLink(lambda job: PlanDropped(job.request_id, job.planned_at, "error", "boom"))
    think = ThinkParams(plan_every=2, deliberation_lag=0, wait=True)
    tokens, thoughts, final = generate(model, link, think, n=20)
    assert len(tokens) == 20 and isinstance(final, FinishEvent) and final.reason == "length"
    assert thoughts and all(t.outcome == "error" for t in thoughts)


# Decision deltas in the engine ---------------------------------------------------------------------------------
def forcing_answer(model, delay_s=0.0, change_of=None):
    """A planner answer whose only branch is the job's pending token, choosing that step's second favourite.

    The change is a real decision delta (planner.decision) unless ``change_of`` builds another one.
    """
    from planner.decision import decision_deltas

    def answer(job: PlanJob) -> StateDelta:
        import time

        time.sleep(delay_s)
        pending = job.tokens[job.planned_at]
        with torch.inference_mode():
            logits = model.step(torch.tensor([pending]), job.state.clone())
        choice = int(logits.argsort(dim=1, descending=True)[0, 1])
        if change_of is None:
            change = decision_deltas(model, job.state.conv, job.state.ssm, torch.tensor([pending]),
                                     torch.tensor([choice]), job.params.trust_region).changes
        else:
            change = change_of(job)
        key = (pending,)
        return StateDelta(job.request_id, job.planned_at, job.apply_at, [pending, choice], {key: 0}, change, [0.9],
                          frozenset({key, key + (choice,)}), frozenset({key}), 1, 0.0, "decision", [choice])

    return answer


def test_the_plan_for_the_first_token_lands_before_that_token_is_chosen(model):
    plain, _, _ = generate(model, None, None, n=6)
    link = ThreadLink(forcing_answer(model, delay_s=0.3))  # late: the sequence must wait for it
    think = ThinkParams(deliberation_lag=0, plan_every=100, wait=True, time_budget_ms=2000)
    tokens, thoughts, final = generate(model, link, think, n=6)
    [job] = link.jobs
    assert job.planned_at == 0 and job.tokens == [ord(" ")]  # the prompt's last token is pending, nothing generated
    [thought] = thoughts
    assert (thought.planned_at, thought.applied_at, thought.outcome) == (0, 0, "applied")
    assert thought.a_eff == 1.0  # full strength when the gate passes
    assert tokens[0].token_id == thought.chosen != plain[0].token_id  # the search's choice, not the greedy one
    assert final.usage.think.outcomes["applied"] == 1


def test_a_plan_below_the_gate_lands_nothing(model):
    plain, _, _ = generate(model, None, None, n=6)
    link = ThreadLink(forcing_answer(model))
    think = ThinkParams(deliberation_lag=0, plan_every=100, min_confidence=0.95)
    tokens, thoughts, _ = generate(model, link, think, n=6)
    assert [t.outcome for t in thoughts] == ["gated"]
    assert [t.token_id for t in tokens] == [t.token_id for t in plain]


class DeferredLink(ThreadLink):
    """Answers each job only when the next one is submitted (late by ``plan_every`` steps, deterministically);
    the last job is never answered."""

    def __init__(self, answer):
        super().__init__(answer)
        self.held = None

    def submit(self, job: PlanJob) -> None:
        self.jobs.append(job)
        if self.held is not None:
            self.deliver(self.answer(self.held))
        self.held = job


def test_a_late_plan_is_dropped_and_counted_never_applied_to_another_step(model):
    plain, _, _ = generate(model, None, None, n=20)
    link = DeferredLink(forcing_answer(model))
    think = ThinkParams(deliberation_lag=1, plan_every=5, wait=False)  # each answer comes 5 steps after it was due
    tokens, thoughts, final = generate(model, link, think, n=20)
    assert len(link.jobs) == 4
    late = [t for t in thoughts if t.applied_at is not None]
    assert len(late) == 3 and all(t.outcome in ("stale", "diverged") and t.applied_at > t.planned_at + 1
                                  for t in late)
    assert [t.outcome for t in thoughts if t.applied_at is None] == ["unanswered"]  # the last, at the end
    assert [t.token_id for t in tokens] == [t.token_id for t in plain]
    counts = final.usage.think.as_dict()
    assert counts["applied"] == 0 and counts["stale"] + counts["diverged"] == 3 and counts["dropped"] == 1


def test_a_non_finite_delta_is_rejected_and_changes_nothing(model):
    plain, _, _ = generate(model, None, None, n=6)
    def nan(job):
        return torch.full((1, *job.state.ssm.shape[:1], *job.state.ssm.shape[2:]), float("nan"))

    link = ThreadLink(forcing_answer(model, change_of=nan))
    tokens, thoughts, _ = generate(model, link, ThinkParams(deliberation_lag=0, plan_every=100), n=6)
    assert [t.outcome for t in thoughts] == ["rejected"]
    assert [t.token_id for t in tokens] == [t.token_id for t in plain]


def test_the_planner_posts_decision_deltas_that_win_where_they_land(model):
    """The real planner (backbone simulator, decision mode), gate open: every applied delta's choice is the token
    the step then produced (greedy), and plans are due at the first token and every plan_every after."""
    link = ThreadLink(planner_answer(model))
    think = ThinkParams(deliberation_lag=0, plan_every=3, min_confidence=0.0, simulations=16, time_budget_ms=5000)
    tokens, thoughts, _ = generate(model, link, think, n=12)
    assert [j.planned_at for j in link.jobs] == [0, 3, 6, 9]
    applied = [t for t in thoughts if t.outcome == "applied"]
    assert len(applied) == 4
    assert all(tokens[t.applied_at].token_id == t.chosen for t in applied)


@pytest.mark.parametrize("pattern", [r"[\s\S]*", "never"])
def test_the_engine_puts_the_verifiers_verdict_on_the_final_event(model, pattern):
    """The verdict is the engine's: its planner link judges the released text as the request ends (no server)."""
    link = ThreadLink(planner_answer(model))
    think = ThinkParams(verifier="regex", verifier_pattern=pattern, injection_rate=0.0)
    tokens, _, final = generate(model, link, think, n=12)
    assert isinstance(final, FinishEvent) and final.reason == "length"
    answer = "".join(t.text for t in tokens) + final.text
    assert final.usage.think.verifier == "regex"
    assert final.usage.think.verified is (re.fullmatch(pattern, answer) is not None)
    assert final.usage.think.as_dict()["verified"] is final.usage.think.verified


def test_a_verifier_that_fails_ends_the_request_without_a_verdict(model):
    link = ThreadLink(planner_answer(model))
    link.judge = lambda params, prompt, answer: 1 / 0
    tokens, _, final = generate(model, link, ThinkParams(verifier="task", injection_rate=0.0), n=6)
    assert final.reason == "length" and len(tokens) == 6
    assert final.usage.think.verifier == "task" and final.usage.think.verified is None
