"""What the engine exchanges with a planner: jobs out, state deltas in.

The engine does not import the planner. It posts a :class:`PlanJob` (a copy
of a sequence's state, its root logits and the tokens so far) through a
:class:`PlannerLink`, and receives :class:`StateDelta` or :class:`PlanDropped`
results through :meth:`engine.loop.scheduler.Engine.post_result`, from any thread.

Steps. A thinking sequence holds its prompt's last token back from the
prefill, so the choice of the first generated token is a decode step like
every later one. Its *decision tokens* are ``[last prompt token] + generated``:
step ``i`` feeds ``tokens[i]`` (pending until then) and its logits choose
generated token ``i``. A job ``planned_at = t`` read the state before step
``t``; its delta lands just before the first step ``>= apply_at = t +
deliberation_lag`` (so lag 0 lands on the very step the plan was made for,
and the first plan is due at the first generated token).

What a delta holds, re-rooted on the real state: the search tree below the
token pending at ``planned_at``, as *branches*. For each searched node (keyed
by its tokens from ``planned_at``, pending token first; a node is the state
after feeding its key) a change of the state *its last token is fed into*
and the search's confidence there. ``delta = "decision"`` (the default): the
minimal-norm change that makes the node's best child (the search's choice)
win the step feeding the node's token (:mod:`planner.decision`), landed at
full strength when the gate passes; ``"child"``: the old state increment of
reading the best child, blended at ``injection_rate * confidence``. Landed
at step ``s``, the tokens ``tokens[t : s + 1]`` are looked up: if the tree
holds that node its change is added; if the session left the tree where the
search had looked at other moves, the delta is dropped as ``diverged``; if
the tree does not reach that far, or the delta is older than
``max_staleness`` steps, as ``stale``. A future of another path is never
blended in, and a delta is never applied to a step other than its own node's.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from torch import Tensor

from engine.state import MambaState

INJECTION_RESULTS = ("applied", "gated", "stale", "diverged", "rejected")


@dataclass(frozen=True)
class ThinkParams:
    """Per-request deliberation settings (``/think`` fields, or ``think`` on a completion)."""

    deliberation_lag: int = 0  # tokens between the state a plan reads and the step it lands on
    simulations: int = 48  # MCTS simulations per plan (leaf evaluations)
    top_k_actions: int = 8  # actions per node: the top-k tokens of the policy
    injection_rate: float = 1.0  # a_eff when the gate passes ("decision"); times the confidence ("child")
    min_confidence: float = 0.5  # gate: a branch whose (calibrated) confidence is below it lands nothing
    plan_every: int = 1  # steps between two plans of a sequence (the first is due at the first generated token)
    time_budget_ms: float = 250.0  # wall-time budget of one search (48 simulations usually end it first)
    max_staleness: int = 32  # steps after planned_at beyond which a delta is dropped
    decay: float = 1.0  # a_eff is multiplied by decay ** realised_lag
    trust_region: float = 0.5  # ||change|| <= trust_region * max(||h||, 1) per layer
    wait: bool = True  # bounded lag: at apply_at the sequence waits for its plan (the others go on)
    delta: Literal["decision", "child"] = "decision"  # "decision": make the search's choice win the step;
    #                                                  "child": the old best-child state
    verifier: str | None = None  # a planner.verifiers name: the reward where a branch ends the answer
    verifier_pattern: str | None = None  # the pattern of the "regex" verifier

    @property
    def max_wait_s(self) -> float:
        """How long a waiting sequence waits for a due plan before going on without it (counted ``timeout``).

        Four times the search budget plus a second: room for a search queued
        behind others on a busy machine, never a stall set by a hung or
        crashed worker (the pool's own hang limit is about the same).
        """
        return 4 * self.time_budget_ms / 1000.0 + 1.0

    @property
    def synchronous(self) -> bool:
        """Lag 0 always waits: the plan of the current step cannot land later."""
        return self.wait or self.deliberation_lag == 0


@dataclass
class PlanJob:
    request_id: Hashable  # the engine's key of the sequence
    planned_at: int
    state: MambaState  # a copy, batch 1: the planner never sees a live tensor
    root_logits: Tensor  # (vocab,) logits of the pending token
    tokens: list[int]  # the sequence's decision tokens so far (see Steps); tokens[planned_at] is the pending one
    params: ThinkParams
    prompt: list[int] = field(default_factory=list)  # the prompt's tokens (a verifier reads the question)
    answer_start: int = 1  # tokens[answer_start:] are generated (tokens[0] is the prompt's last token)
    stop: tuple[str, ...] = ()  # the request's stop strings: where an answer ends for a verifier

    @property
    def apply_at(self) -> int:
        return self.planned_at + self.params.deliberation_lag


@dataclass
class StateDelta:
    request_id: Hashable
    planned_at: int
    apply_at: int
    path: list[int]  # the plan's main line (most visited moves); path[0] is the token pending at planned_at
    branches: dict[tuple[int, ...], int]  # node (tokens from planned_at) -> row of changes / confidences
    changes: Tensor  # (M, n_layer, d_inner, d_state): the state change of the node's best move
    confidences: list[float]  # in [0, 1], from the search statistics at that node
    nodes: frozenset[tuple[int, ...]] = frozenset()  # every node of the tree
    inner: frozenset[tuple[int, ...]] = frozenset()  # the nodes the search looked below (a branch or not)
    simulations: int = 0
    seconds: float = 0.0
    mode: str = "decision"  # what the changes are: "decision" or "child" (see the module doc)
    choices: list[int] = field(default_factory=list)  # per branch: the search's choice (the node's best child)
    evidence: list[tuple[float, float]] = field(default_factory=list)  # per branch: (visit share, value advantage)

    def lookup(self, taken: Sequence[int]) -> tuple[str, int | None]:
        """("match", row) when the tree holds the node ``taken``; else ("diverged" | "stale", None)."""
        key = tuple(taken)
        if key in self.branches:
            return "match", self.branches[key]
        for i in range(1, len(key) + 1):
            if key[:i] not in self.nodes:  # the session left the tree here
                return ("diverged" if key[: i - 1] in self.inner else "stale"), None
        return "stale", None  # a leaf: the search did not look further


@dataclass
class PlanDropped:
    """A job that produced no delta (superseded, queue overflow, error, timeout, discarded)."""

    request_id: Hashable
    planned_at: int
    outcome: str
    detail: str = ""


@dataclass
class ThoughtEvent:
    """One delta's fate, streamed by ``/think`` (token events are :class:`engine.loop.scheduler.TokenEvent`)."""

    planned_at: int
    applied_at: int | None
    outcome: str  # an INJECTION_RESULTS value, or a PlanDropped outcome
    confidence: float
    a_eff: float
    delta_norm: float
    path: list[int]
    simulations: int
    time: float
    chosen: int | None = None  # the search's choice at the node the delta landed on


@dataclass
class ThinkTotals:
    plans: int = 0
    simulations: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    verifier: str | None = None  # set by the engine at finish when the request named a verifier
    verified: bool | None = None  # that verifier's verdict on the final answer (the planner link's ``judge``)

    def count(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    def as_dict(self) -> dict[str, object]:
        verdict = {"verifier": self.verifier, "verified": self.verified} if self.verifier is not None else {}
        return {"plans": self.plans, "simulations": self.simulations, **{k: self.outcomes.get(k, 0) for k in
                                                                         INJECTION_RESULTS}, "dropped":
                sum(v for k, v in self.outcomes.items() if k not in INJECTION_RESULTS), **verdict}


class PlannerLink(Protocol):
    """The engine's side of a planner pool.

    :meth:`engine.loop.scheduler.Engine.attach_planner` calls ``connect`` once with
    the engine's ``post_result`` (where results go, callable from any thread),
    so a pool and an engine are built independently and joined afterwards.
    ``submit`` and ``discard`` come from the engine thread and must not block.
    ``judge`` too, once per request that names a verifier, as it ends: the
    verifier's verdict on the final answer (the text the client received,
    without the stop string), which the final event carries in
    ``usage.think``; the engine knows no verifier itself.
    """

    def connect(self, deliver: Callable[[StateDelta | PlanDropped], None]) -> None: ...

    def submit(self, job: PlanJob) -> None: ...

    def discard(self, request_id: Hashable) -> None: ...

    def judge(self, params: ThinkParams, prompt: str, answer: str) -> bool | None: ...


