"""Deliberation in the decode loop: plan jobs out to a planner, state deltas back into live rows.

A sequence that thinks holds its prompt's last token back from the prefill
(:meth:`Deliberation.begin`), so the step that chooses its first generated
token is a decode step a plan can land on; it posts a
:class:`~engine.thinking.PlanJob` every ``plan_every`` steps, the first one
before that first choice (steps: see :mod:`engine.thinking`). The
planner's answers arrive on any thread through :meth:`Deliberation.post_result`
and are sorted to their sequences before each decode step; a delta that is
due is landed (gated injection, :func:`engine.loop.injection.land`) on the
sequence's SSM state just before the step that reads it. Bounded lag: a
sequence whose due plan has not answered leaves the batch (the engine pauses
it) until the plan answers or its wait runs out; the others keep decoding.

Everything here runs on the engine thread except :meth:`Deliberation.post_result`.
The engine owns the sequences and the batch; this module only reads states and
writes the rows it is handed.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import Tensor

from engine.loop.injection import land
from engine.requests import EngineObserver, RequestHandle
from engine.state import MambaState
from engine.thinking import PlanDropped, PlanJob, PlannerLink, StateDelta, ThinkParams, ThinkTotals, ThoughtEvent

if TYPE_CHECKING:
    from engine.loop.sequence import ActiveSequence

log = logging.getLogger(__name__)


@dataclass
class PlanState:
    """A thinking sequence's plans: jobs posted and not answered, deltas waiting for their step."""

    held: list[int] = field(default_factory=list)  # the prompt's last token, held back from the prefill
    last_plan: int | None = None  # the step of the newest job
    outstanding: dict[int, int] = field(default_factory=dict)  # planned_at -> apply_at of unanswered jobs
    deltas: list[StateDelta] = field(default_factory=list)
    totals: ThinkTotals = field(default_factory=ThinkTotals)
    paused_since: float = 0.0


def thinking(seq: ActiveSequence) -> tuple[ThinkParams, PlanState]:
    """A thinking sequence's settings and plans (everything below is called for thinking sequences only)."""
    assert seq.req.think is not None and seq.plans is not None, "not a thinking sequence"
    return seq.req.think, seq.plans


def decision_tokens(seq: ActiveSequence) -> list[int]:
    """A thinking sequence's held prompt token, then its generated tokens; the last one is pending."""
    return thinking(seq)[1].held + seq.generated


def held(seq: ActiveSequence) -> int:
    """Prompt tokens a sequence keeps out of its prefill (1 when it thinks): the first decode step feeds it."""
    return len(seq.plans.held) if seq.plans is not None else 0


class Deliberation:
    def __init__(self, observer: EngineObserver, emit: Callable[[RequestHandle, ThoughtEvent], None],
                 max_state_norm: float):
        self.link: PlannerLink | None = None
        self.observer = observer
        self.max_state_norm = max_state_norm
        self._emit = emit
        self._thinking: dict[Hashable, ActiveSequence] = {}  # request id -> sequence
        self._results: collections.deque[StateDelta | PlanDropped] = collections.deque()
        self._results_ready = threading.Condition()

    @property
    def active(self) -> bool:
        """Whether any sequence in flight thinks (the decode step skips all of this otherwise)."""
        return bool(self._thinking)

    def post_result(self, result: StateDelta | PlanDropped) -> None:
        """A planner's answer to a PlanJob (any thread); landed at the step it is due."""
        with self._results_ready:
            self._results.append(result)
            self._results_ready.notify()

    # A sequence's life -----------------------------------------------------
    def begin(self, seq: ActiveSequence) -> None:
        """Start thinking for an admitted sequence: hold its last prompt token back (see :func:`held`).

        Not at rate 0: nothing can land then, and the prompt goes in as one prefill, so the tokens and
        logprobs are bit-identical to not thinking (a decode step and the chunked prefill agree on the
        tokens, not on the last bits of the logits).
        """
        params, plans = thinking(seq)
        plans.held = seq.to_feed[-1:] if params.injection_rate > 0 else []
        self._thinking[seq.handle.id] = seq

    def end(self, seq: ActiveSequence, prompt_text: Callable[[], str]) -> None:
        """Forget a sequence's plans (those still unanswered are counted, ``unanswered``); the planner may drop
        its tree; a request that names a verifier gets its verdict. Called before the sequence's final event, so
        these thoughts come before it and the verdict is on it."""
        if self._thinking.pop(seq.handle.id, None) is not None and self.link is not None:
            self.link.discard(seq.handle.id)
        self._judge(seq, prompt_text)
        plans = thinking(seq)[1]
        now = time.monotonic()
        for planned_at in sorted(plans.outstanding):
            self._thought(seq, ThoughtEvent(planned_at, None, "unanswered", 0.0, 0.0, 0.0, [], 0, now))
        for delta in plans.deltas:  # answered but never due: the sequence ended first
            self._thought(seq, ThoughtEvent(delta.planned_at, None, "unlanded", 0.0, 0.0, 0.0, delta.path,
                                            delta.simulations, now))
        plans.deltas.clear()
        plans.outstanding.clear()

    def _judge(self, seq: ActiveSequence, prompt_text: Callable[[], str]) -> None:
        """The planner's verifier on the final answer, into the final event's ``usage.think`` (not for a request
        that failed: its answer is not one). A verifier that fails says nothing and ends nothing."""
        (params, plans), finish, answer = thinking(seq), seq.finished, seq.answer
        if params.verifier is None or answer is None or self.link is None or finish is None \
                or finish.reason == "error":
            return
        totals = plans.totals
        totals.verifier = params.verifier
        try:
            totals.verified = self.link.judge(params, prompt_text(), "".join(answer))
        except Exception:  # noqa: BLE001 - the request still ends, without a verdict
            log.exception("request %s: the verifier %r failed on the final answer", seq.handle.id, params.verifier)

    # Jobs out ---------------------------------------------------------------
    def maybe_plan(self, seq: ActiveSequence, snapshot: Callable[[], MambaState], logits: Tensor) -> None:
        """Post a job if one is due; ``snapshot()`` copies the state, ``logits`` chose the pending token."""
        params, plans = thinking(seq)
        tokens = decision_tokens(seq)
        step = len(tokens) - 1
        if self.link is None or (plans.last_plan is not None and step - plans.last_plan < params.plan_every):
            return
        job = PlanJob(seq.handle.id, step, snapshot(), logits.detach().clone(), tokens, params,
                      list(seq.req.prompt_ids), len(plans.held), tuple(seq.req.stop))
        plans.last_plan = step
        plans.outstanding[step] = job.apply_at
        plans.totals.plans += 1
        self.link.submit(job)

    # Results in ---------------------------------------------------------------
    def collect(self) -> None:
        """Hand the results that arrived to their sequences (those that ended or gave up drop them)."""
        with self._results_ready:
            results = list(self._results)
            self._results.clear()
        for result in results:
            seq = self._thinking.get(result.request_id)
            if seq is None:
                continue
            plans = thinking(seq)[1]
            if plans.outstanding.pop(result.planned_at, None) is None:
                continue
            if isinstance(result, StateDelta):
                plans.totals.simulations += result.simulations
                plans.deltas.append(result)
            else:
                self._thought(seq, ThoughtEvent(result.planned_at, None, result.outcome, 0.0, 0.0, 0.0, [], 0,
                                                time.monotonic()))

    def wait_for_results(self, timeout: float) -> None:
        """Sleep until a result arrives or ``timeout`` passes (when nothing else is left to do)."""
        with self._results_ready:
            if not self._results:
                self._results_ready.wait(timeout=timeout)

    # Bounded lag ---------------------------------------------------------------
    def _due_jobs(self, seq: ActiveSequence) -> list[int]:
        """planned_at of the jobs that must answer before the sequence's next step (when it waits)."""
        if seq.plans is None:
            return []
        params, plans = thinking(seq)
        if not params.synchronous:
            return []
        step = len(decision_tokens(seq)) - 1
        return [t for t, apply_at in plans.outstanding.items() if apply_at <= step]

    def must_wait(self, seq: ActiveSequence) -> bool:
        if self._due_jobs(seq):
            thinking(seq)[1].paused_since = time.monotonic()
            return True
        return False

    def may_resume(self, seq: ActiveSequence, now: float) -> bool:
        """Whether a paused sequence may go on: its plans answered, or its wait ran out (counted ``timeout``)."""
        due = self._due_jobs(seq)
        if not due:
            return True
        params, plans = thinking(seq)
        if now - plans.paused_since < params.max_wait_s:
            return False
        for planned_at in due:
            plans.outstanding.pop(planned_at, None)
            self._thought(seq, ThoughtEvent(planned_at, None, "timeout", 0.0, 0.0, 0.0, [], 0, now))
        return True

    # Landing -------------------------------------------------------------------
    def land_due(self, seq: ActiveSequence, h: Tensor) -> None:
        """Blend the sequence's due deltas into ``h``, its live SSM state (n_layer, d_inner, d_state)."""
        params, plans = thinking(seq)
        if not plans.deltas:
            return
        tokens = decision_tokens(seq)
        step = len(tokens) - 1  # the step about to run: it feeds tokens[step] and chooses the next token
        due = sorted((d for d in plans.deltas if d.apply_at <= step), key=lambda d: d.planned_at)
        plans.deltas = [d for d in plans.deltas if d.apply_at > step]
        for delta in due:
            lag = step - delta.planned_at
            taken = tokens[delta.planned_at : step + 1]  # tokens fed since planned_at, and the pending one
            landing = land(h, delta, taken, lag, params, self.max_state_norm)
            self.observer.on_injection(landing.result, landing.confidence, landing.a_eff, lag)
            self._thought(seq, ThoughtEvent(delta.planned_at, step, landing.result, landing.confidence,
                                            landing.a_eff, landing.delta_norm, delta.path, delta.simulations,
                                            time.monotonic(), landing.chosen))

    def _thought(self, seq: ActiveSequence, event: ThoughtEvent) -> None:
        thinking(seq)[1].totals.count(event.outcome)
        self._emit(seq.handle, event)
