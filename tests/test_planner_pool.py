"""The planner pool with real worker processes: plans land; a worker that raises, hangs or dies never stops a stream."""

from __future__ import annotations

import asyncio
import collections

import pytest

from engine.checkpoint import save_checkpoint
from engine.loop.scheduler import Engine
from engine.requests import GenerationRequest, TokenEvent
from engine.sampling import SamplingParams
from engine.text.tokenizer import ByteTokenizer
from engine.thinking import ThinkParams, ThoughtEvent
from planner.pool import PlannerObserver, PlannerPool
from planner.worker import WorkerSpec
from tests import planner_faults
from tests.conftest import make_model

TOK = ByteTokenizer()


class Counts(PlannerObserver):
    def __init__(self):
        self.jobs = collections.Counter()
        self.simulations = 0

    def on_planner_job(self, outcome, seconds=0.0, simulations=0):
        self.jobs[outcome] += 1
        self.simulations += simulations


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = make_model(seed=9, vocab_size=TOK.vocab_size)
    return model, save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "tiny")


def run_streams(model, checkpoint, think: ThinkParams, target=None, streams=3, n=24, **pool_kw):
    counts = Counts()

    async def main():
        if target is not None:
            pool_kw["target"] = target
        pool = PlannerPool(WorkerSpec(str(checkpoint), simulator="backbone", nice=0), observer=counts, **pool_kw)
        engine = Engine(model, TOK)
        engine.attach_planner(pool)
        await pool.start()
        engine.start()
        try:
            while not (engine.ready.is_set() and pool.ready):
                await asyncio.sleep(0.05)
            handles = [engine.submit(GenerationRequest(TOK.encode(f"stream {i}: "), SamplingParams(temperature=0),
                                                       max_tokens=n, ignore_eos=True, think=think))
                       for i in range(streams)]
            results = await asyncio.gather(*[collect(h) for h in handles])
            plans = sum(events[-1].usage.think.plans for events in results)
            for _ in range(600):  # every job gets exactly one answer from the pool, even after its stream ended
                if sum(counts.jobs.values()) >= plans:
                    break
                await asyncio.sleep(0.05)
            return results
        finally:
            engine.shutdown()
            await pool.stop()

    results = asyncio.run(asyncio.wait_for(main(), timeout=120))
    return results, counts


async def collect(handle) -> list:
    return [e async for e in handle.events()]


def summary(results):
    tokens = [sum(isinstance(e, TokenEvent) for e in events) for events in results]
    thoughts = collections.Counter(e.outcome for events in results for e in events if isinstance(e, ThoughtEvent))
    return tokens, thoughts, [events[-1].reason for events in results]


def test_plans_from_worker_processes_land_in_live_streams(checkpoint):
    model, path = checkpoint
    think = ThinkParams(plan_every=4, deliberation_lag=1, simulations=16, injection_rate=0.5, min_confidence=0.0,
                        time_budget_ms=2000)
    results, counts = run_streams(model, path, think)
    tokens, thoughts, reasons = summary(results)
    assert tokens == [24, 24, 24] and reasons == ["length"] * 3
    assert counts.jobs["completed"] >= 3 and counts.simulations > 0
    assert thoughts["applied"] + thoughts["gated"] + thoughts["diverged"] + thoughts["stale"] == counts.jobs["completed"]


@pytest.mark.parametrize("fault, outcome", [("raising_worker", "error"), ("hanging_worker", "timeout"),
                                            ("crashing_worker", "error")])
def test_a_failing_worker_never_stops_a_stream(checkpoint, fault, outcome):
    model, path = checkpoint
    think = ThinkParams(plan_every=100, deliberation_lag=0, wait=True, time_budget_ms=50)
    results, counts = run_streams(model, path, think, target=getattr(planner_faults, fault), hang_grace_s=0.5)
    tokens, thoughts, reasons = summary(results)
    assert tokens == [24, 24, 24] and reasons == ["length"] * 3
    # The pool answered every job and counted the failure (jobs still queued when their stream ended are
    # discarded); the waiting streams went on with that answer, or at their own wait limit if it came later.
    assert counts.jobs[outcome] >= 1 and counts.jobs[outcome] + counts.jobs["discarded"] == 3
    assert counts.jobs["completed"] == 0
    assert sum(thoughts.values()) == 3 and set(thoughts) <= {outcome, "timeout"}
