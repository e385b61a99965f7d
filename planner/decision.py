"""Decision deltas: the smallest change of a live SSM state that makes the search's choice win the next step.

The engine lands a delta just before a decode step; that step feeds the
pending token ``x`` and its logits choose the next token. So the change that
matters is not the state increment of *reading* the chosen token ``a*`` (that
moves the prediction towards what follows ``a*``, one step off), but a change
``d`` of the state ``h`` the step reads such that

    margin(d) = l[a*] - max_{b != a*} l[b] >= target,   l = logits(step(h + d, x))

with ``||d||`` as small as possible. One step is smooth in ``h``, so a few
Newton steps on the margin do it: linearise ``m(d + s) ~ m(d) + g . s``, take
the minimal-norm ``s = (target - m) g / |g|^2``, repeat, and project every
layer's change onto the trust region ``||d_l|| <= rho * max(||h_l||, 1)``
(the engine clips to the same region). It costs one backward pass through one
decode step per iteration, batched over all branches of all jobs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from engine.models import MambaLMHeadModel
from engine.state import MambaState

DEFAULT_TARGET_MARGIN = 1.0  # logits: the chosen token wins by this much on the predicted state
DEFAULT_ITERATIONS = 5


@dataclass
class Decision:
    changes: Tensor  # (M, n_layer, d_inner, d_state) float32, finite, inside the trust region
    margins: list[float]  # the chosen token's margin after the change, on the state it was computed for


def margins(logits: Tensor, targets: Tensor) -> Tensor:
    """``l[a*] - max_{b != a*} l[b]`` per row (positive: ``a*`` is the strict argmax)."""
    chosen = logits.gather(1, targets.view(-1, 1)).squeeze(1)
    others = logits.scatter(1, targets.view(-1, 1), float("-inf")).max(dim=1).values
    return chosen - others


def project(change: Tensor, limit: Tensor) -> Tensor:
    """Scale each (layer, row) of ``change`` (L, M, ...) back inside ``limit`` (L, M)."""
    norm = change.flatten(2).norm(dim=2)
    scale = (limit / norm.clamp_min(1e-30)).clamp(max=1.0)
    return change * scale.view(*scale.shape, *([1] * (change.dim() - 2)))


def decision_deltas(model: MambaLMHeadModel, conv: Tensor, ssm: Tensor, tokens: Tensor, targets: Tensor,
                    trust_region: float | Tensor, target_margin: float = DEFAULT_TARGET_MARGIN,
                    iterations: int = DEFAULT_ITERATIONS) -> Decision:
    """Changes of ``ssm`` (n_layer, M, d_inner, d_state) making ``targets`` win the step that feeds ``tokens``.

    ``conv``/``ssm`` are the states the step reads (the parents of the
    searched nodes), ``tokens`` (M,) the tokens it feeds, ``targets`` (M,) the
    search's choices; ``trust_region`` one for all rows or (M,), one per row
    (rows of several requests share a batch, each with its own). Rows whose
    choice already wins by ``target_margin`` get no change. Runs with autograd on copies, whatever mode the caller is in.
    """
    with torch.inference_mode(False), torch.enable_grad():
        conv = conv.clone()
        base = ssm.float().clone()
        tokens, targets = tokens.clone().view(-1, 1), targets.clone().view(-1)
        region = torch.as_tensor(trust_region, dtype=torch.float32).clamp_min(0.0)  # () or (M,)
        limit = region * base.flatten(2).norm(dim=2).clamp_min(1.0)  # (L, M)
        change = torch.zeros_like(base)
        for it in range(iterations + 1):
            var = change.clone().requires_grad_(it < iterations)
            logits, _ = model.forward(tokens, state=MambaState(conv, base + var), last_only=True)
            m = margins(logits.float(), targets)
            need = (target_margin - m.detach()).clamp_min(0.0)
            if it == iterations or not bool((need > 0).any()):
                break
            (grad,) = torch.autograd.grad(m.sum(), var)  # rows are independent: row i's grad is d m_i / d h_i
            grad = grad.detach().nan_to_num(0.0)
            sq = grad.pow(2).sum(dim=(0, 2, 3))  # (M,)
            step = grad * (need / sq.clamp_min(1e-12)).view(1, -1, 1, 1)
            change = project(change + step, limit)
        change = change.detach()
        finite = torch.isfinite(change.transpose(0, 1).flatten(1)).all(dim=1) if change.numel() else None
        if finite is not None and not bool(finite.all()):
            change[:, ~finite] = 0.0
        return Decision(change.transpose(0, 1).contiguous(), m.detach().tolist())
