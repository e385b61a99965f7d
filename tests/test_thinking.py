"""Gated injection and the engine's side of thinking: gating math, bounds, lag, staleness, divergence."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from engine.injection import effective_rate, inject
from engine.models.planner_net import PlannerNet
from engine.requests import FinishEvent, GenerationRequest, TokenEvent
from engine.sampling import SamplingParams
from engine.scheduler import Engine
from engine.thinking import PlanJob, StateDelta, ThinkParams, ThoughtEvent
from engine.tokenizer import ByteTokenizer
from planner.planner import Planner
from planner.simulators import BackboneSimulator
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
    assert [t.logprob for t in tokens] == [t.logprob for t in plain]


def test_a_failed_plan_never_stops_a_waiting_sequence(model):
    from engine.thinking import PlanDropped

    link = ThreadLink(lambda job: PlanDropped(job.request_id, job.planned_at, "error", "boom"))
    think = ThinkParams(plan_every=2, deliberation_lag=0, wait=True)
    tokens, thoughts, final = generate(model, link, think, n=20)
    assert len(tokens) == 20 and isinstance(final, FinishEvent) and final.reason == "length"
    assert thoughts and all(t.outcome == "error" for t in thoughts)
