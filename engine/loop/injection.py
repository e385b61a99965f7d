"""Gated state injection: how a planner's target reaches a live SSM state.

A decision delta (the default, :mod:`planner.decision`) lands at full
strength when the gate passes and not at all when it does not:
``a_eff = injection_rate * [confidence >= min_confidence] * decay ** realised_lag``
(``injection_rate`` is 1 by default; its confidence is calibrated, so the gate
is the search's own evidence). A ``"child"`` delta keeps the old blend,
``a_eff = injection_rate * gate(confidence) * decay ** realised_lag`` with
``gate(c) = c`` for ``c >= min_confidence`` and 0 below. Then, per layer,
``h <- h + a_eff * change``.

The state stays bounded whatever a planner sends: a target that is not
finite is rejected, the change ``h_target - h`` is clipped per layer to a
trust region ``||change|| <= rho * max(||h||, 1)``, and a blended layer whose
norm would pass ``max_norm`` is scaled back onto that sphere. With
``a_eff = 0`` nothing is touched, so decoding is bit-identical to no planner.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from engine.thinking import StateDelta, ThinkParams

DEFAULT_MAX_NORM = 1e4


@dataclass(frozen=True)
class Injection:
    result: str  # "applied", "gated" or "rejected"
    a_eff: float
    delta_norm: float  # norm of the change actually blended in (after clipping and a_eff)


def effective_rate(confidence: float, params: ThinkParams, realised_lag: int, mode: str = "child") -> float:
    """``a_eff`` in [0, injection_rate]; 0 for a confidence below the gate or not a number in [0, 1]."""
    if not math.isfinite(confidence) or confidence < max(params.min_confidence, 0.0):
        return 0.0
    rate = min(max(params.injection_rate, 0.0), 1.0)
    strength = 1.0 if mode == "decision" else min(confidence, 1.0)
    return rate * strength * params.decay ** max(realised_lag, 0)


@torch.no_grad()
def inject(h: Tensor, change: Tensor, a_eff: float, trust_region: float, max_norm: float = DEFAULT_MAX_NORM) -> Injection:
    """Blend ``h`` (n_layer, d_inner, d_state), a live view, towards ``h + change`` in place."""
    if a_eff <= 0.0 or not math.isfinite(a_eff):
        return Injection("gated", 0.0, 0.0)
    if change.shape != h.shape or not bool(torch.isfinite(change).all()):
        return Injection("rejected", a_eff, 0.0)
    change = change.to(device=h.device, dtype=h.dtype)
    layers = h.shape[0]
    h_norm = h.reshape(layers, -1).norm(dim=1)
    c_norm = change.reshape(layers, -1).norm(dim=1)
    limit = max(trust_region, 0.0) * h_norm.clamp_min(1.0)
    scale = (limit / c_norm.clamp_min(1e-30)).clamp(max=1.0) * min(a_eff, 1.0)
    step = change * scale.view(layers, 1, 1)
    blended = h + step
    b_norm = blended.reshape(layers, -1).norm(dim=1)
    blended *= (max_norm / b_norm.clamp_min(1e-30)).clamp(max=1.0).view(layers, 1, 1)
    if not bool(torch.isfinite(blended).all()):
        return Injection("rejected", a_eff, 0.0)
    delta_norm = float((blended - h).norm())
    h.copy_(blended)
    return Injection("applied", a_eff, delta_norm)


@dataclass(frozen=True)
class Landing:
    result: str  # an INJECTION_RESULTS value
    confidence: float
    a_eff: float
    delta_norm: float
    chosen: int | None = None  # the search's choice at the node it landed on (the token a decision delta favours)


def land(h: Tensor, delta: StateDelta, taken: Sequence[int], realised_lag: int, params: ThinkParams,
         max_norm: float = DEFAULT_MAX_NORM) -> Landing:
    """Land ``delta`` on ``h`` once the sequence has ``taken`` these tokens since it was planned.

    The node the sequence reached is looked up in the delta's tree; its
    change is blended in, gated by its confidence (see the module doc), or
    the delta is dropped as stale or diverged. The engine and the offline
    evaluation (:mod:`planner.offline.evaluate`) both land deltas through here.
    """
    found, branch = delta.lookup(taken) if realised_lag <= params.max_staleness else ("stale", None)
    if branch is None:
        return Landing(found, 0.0, 0.0, 0.0)
    confidence = float(delta.confidences[branch])
    injection = inject(h, delta.changes[branch], effective_rate(confidence, params, realised_lag, delta.mode),
                       params.trust_region, max_norm)
    chosen = delta.choices[branch] if branch < len(delta.choices) else None
    return Landing(injection.result, confidence, injection.a_eff, injection.delta_norm, chosen)
