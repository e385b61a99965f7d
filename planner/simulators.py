"""What a search expands leaves with: the learned dynamics, or the real backbone step.

Both take a batch of parent states and one token per parent and return the
child states, next-token logits at the children and their values, so one
call evaluates many leaves of many trees. States are tuples of tensors whose
dim 1 is the batch (the engine's layout), so a tree can keep them in one
store per part and gather rows.

- :class:`LatentSimulator`: the planner net's dynamics and heads; SSM state
  only; much cheaper than a backbone step for real-sized models, approximate.
- :class:`BackboneSimulator`: the backbone's own step (exact states and
  logits, conv and SSM state), with the planner net's value head. On tiny
  backbones it costs about as much as the dynamics and is exact, so it is the
  better simulator there; ``loadtest/bench_planner.py`` measures both.

:func:`make_simulator` builds one by name; :func:`choose_simulator` resolves
``auto`` (as the server's ``--planner-simulator`` and the evaluation do).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from engine.models import MambaLMHeadModel
from engine.models.planner_net import PlannerNet
from engine.state import MambaState

AUTO_COST_RATIO = 3.0  # the dynamics must be this much cheaper than the backbone step for "auto" to pick it


@dataclass
class Expansion:
    states: tuple[Tensor, ...]  # each (n_layer, b, ...)
    logits: Tensor  # (b, vocab)
    values: Tensor  # (b,) in [-1, 1]


class LatentSimulator:
    name = "dynamics"

    def __init__(self, net: PlannerNet):
        self.net = net

    def root_states(self, snapshot: MambaState) -> tuple[Tensor, ...]:
        return (snapshot.ssm.float(),)

    def value(self, states: tuple[Tensor, ...]) -> Tensor:
        return self.net.evaluate(states[0]).value

    def expand(self, states: tuple[Tensor, ...], tokens: Tensor) -> Expansion:
        (ssm,) = states
        nxt = self.net.dynamics(ssm, tokens)
        ev = self.net.evaluate(nxt)
        return Expansion((nxt,), ev.logits, ev.value)


class BackboneSimulator:
    name = "backbone"

    def __init__(self, model: MambaLMHeadModel, net: PlannerNet):
        self.model = model
        self.net = net

    def root_states(self, snapshot: MambaState) -> tuple[Tensor, ...]:
        return (snapshot.conv, snapshot.ssm)

    def value(self, states: tuple[Tensor, ...]) -> Tensor:
        return self.net.evaluate(states[1]).value

    def expand(self, states: tuple[Tensor, ...], tokens: Tensor) -> Expansion:
        state = MambaState(states[0].clone(), states[1].clone())  # step() works in place
        logits = self.model.step(tokens, state)
        return Expansion((state.conv, state.ssm), logits.float(), self.net.evaluate(state.ssm).value)


Simulator = LatentSimulator | BackboneSimulator


def make_simulator(kind: str, model: MambaLMHeadModel, net: PlannerNet) -> Simulator:
    if kind == "dynamics":
        return LatentSimulator(net)
    if kind == "backbone":
        return BackboneSimulator(model, net)
    raise ValueError(f"unknown simulator {kind!r} (dynamics or backbone)")


def choose_simulator(kind: str, model: MambaLMHeadModel, net: PlannerNet,
                     trained: bool) -> tuple[str, dict[str, float]]:
    """Resolve "auto" by timing both simulators on a batch of 64 leaves here (see AUTO_COST_RATIO)."""
    if kind != "auto":
        return kind, {}
    if not trained:
        return "backbone", {}
    state = model.allocate_state(64)
    state.ssm.normal_()
    tokens = torch.zeros(64, dtype=torch.long)
    costs = {}
    for sim in (LatentSimulator(net), BackboneSimulator(model, net)):
        states = sim.root_states(state)
        sim.expand(states, tokens)
        start = time.perf_counter()
        for _ in range(5):
            sim.expand(states, tokens)
        costs[sim.name] = (time.perf_counter() - start) / 5
    ratio = costs["backbone"] / max(costs["dynamics"], 1e-9)
    return ("dynamics" if ratio >= AUTO_COST_RATIO else "backbone"), {"cost_ratio": ratio}


def ssm_part(simulator: Simulator) -> int:
    """Index of the SSM state in the simulator's state tuple."""
    return 0 if isinstance(simulator, LatentSimulator) else 1


def as_long(tokens: list[int]) -> Tensor:
    return torch.tensor(tokens, dtype=torch.long)
