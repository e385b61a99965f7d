"""Pure-PyTorch SSD (Mamba-2's state space duality) scan, for prefill and for one decode step.

Per head h (``headdim`` channels p), state index n, with a scalar decay per
head and B, C shared by the heads of a group::

    H_t = exp(dt_t * A_h) * H_{t-1} + dt_t * x_t B_t^T      (P x N per head)
    y_t = H_t C_t

Because the decay is a scalar per head, the recurrence inside a chunk of Q
steps is a masked matrix product (the "attention" form): with
``a_t = cumsum(dt * A)``, ``y_l = sum_{s <= l} exp(a_l - a_s) (C_l . B_s) dt_s x_s``
plus the chunk's start state read through ``exp(a_l) C_l``. So prefill is
matrix multiplies (``Q x Q`` scores, ``P x N`` chunk states) plus one carry
per chunk, which is why Mamba-2 prefills at matmul speed where Mamba-1 needs
a scan. Chunks run one after another, so memory holds one chunk's ``Q x Q``
scores per head, not the whole prompt's. Exponents are differences
``a_l - a_s <= 0`` inside a chunk: nothing overflows for any dt.

Padding: a step with ``dt = 0`` is the identity (decay 1, input 0), so
callers zero ``dt`` past each row's end to batch unequal lengths, and a
prompt that is not a multiple of the chunk is padded the same way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def ssd_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int,
             h0: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Run the recurrence over whole sequences, chunk by chunk.

    Args:
        x: (b, L, H, P) inputs.
        dt: (b, L, H) final step sizes (bias, softplus, clamp and padding applied).
        A: (H,) negative decay rates.
        B, C: (b, L, G, N), G groups dividing H.
        chunk_size: steps per chunk (the result is the same for any, up to rounding; engine/ops caps the config's
            on CPU); shorter prompts take one chunk of their length.
        h0: (b, H, P, N) start state, or None for zeros.

    Returns:
        y: (b, L, H, P) float32, without the D skip and the gate.
        h_last: (b, H, P, N) float32 state after the last step.
    """
    b, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    hg = H // G
    Q = max(1, min(chunk_size, L))
    pad = (-L) % Q
    x, dt, B, C = x.float(), dt.float(), B.float(), C.float()
    if pad:
        x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
        dt = F.pad(dt, (0, 0, 0, pad))  # dt 0: padded steps leave the state as it is
    n_chunks = (L + pad) // Q
    xdt = (x * dt.unsqueeze(-1)).view(b, n_chunks, Q, G, hg, P).permute(0, 1, 3, 4, 2, 5)  # (b, c, G, hg, Q, P)
    Bg = B.view(b, n_chunks, Q, G, N).permute(0, 1, 3, 2, 4)  # (b, c, G, Q, N)
    Cg = C.view(b, n_chunks, Q, G, N).permute(0, 1, 3, 2, 4)
    log_decay = (dt * A.float()).view(b, n_chunks, Q, G, hg).permute(0, 1, 3, 4, 2).cumsum(-1)  # (b, c, G, hg, Q)
    causal = torch.ones(Q, Q, dtype=torch.bool, device=x.device).tril()
    h = x.new_zeros(b, G, hg, P, N) if h0 is None else h0.float().reshape(b, G, hg, P, N)
    inputs = (x, dt, A, B, C) if h0 is None else (x, dt, A, B, C, h0)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
    ys = []
    for c in range(n_chunks):
        a = log_decay[:, c]  # (b, G, hg, Q), decreasing along Q
        # C_l . B_s, shared by a group's heads, zeroed above the diagonal (s > l). There a_l - a_s >= 0, whose exp
        # could overflow: clamped to 0 it gives exp(0) = 1, which the zero score then removes.
        scores = (Cg[:, c] @ Bg[:, c].transpose(-1, -2)).masked_fill_(~causal, 0.0).unsqueeze(2)  # (b, G, 1, Q, Q)
        weights = a.unsqueeze(-1) - a.unsqueeze(-2)  # (b, G, hg, Q, Q)
        if grad:  # training and the planner's decision deltas: out of place, for autograd
            weights = weights.clamp_max(0.0).exp() * scores
        else:
            weights = weights.clamp_max_(0.0).exp_().mul_(scores)
        y = weights @ xdt[:, c]  # within the chunk: (b, G, hg, Q, P)
        from_start = (Cg[:, c].unsqueeze(2) @ h.transpose(-1, -2)) * a.exp().unsqueeze(-1)  # the start state's part
        ys.append(y + from_start if grad else y.add_(from_start))
        to_end = (a[..., -1:] - a).exp()  # (b, G, hg, Q): decay from each step to the chunk's end
        inputs_to_end = (xdt[:, c] * to_end.unsqueeze(-1)).transpose(-1, -2)  # (b, G, hg, P, Q)
        h = h * a[..., -1].exp()[..., None, None] + inputs_to_end @ Bg[:, c].unsqueeze(2)
    y = torch.stack(ys, 1).permute(0, 1, 4, 2, 3, 5).reshape(b, n_chunks * Q, H, P)[:, :L]
    return y, h.reshape(b, H, P, N)


def ssd_step(h: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor) -> Tensor:
    """One decode step; ``h`` (b, H, P, N) float32 advances in place.

    x (b, H, P), dt (b, H) final, A (H,), B and C (b, G, N). Returns y (b, H, P) float32 without D and gate.
    """
    b, H, P, N = h.shape
    G = B.shape[1]
    hv = h.view(b, G, H // G, P, N)
    dt32 = dt.float()
    hv.mul_((dt32 * A.float()).exp().view(b, G, H // G, 1, 1))
    xdt = (x.float() * dt32.unsqueeze(-1)).view(b, G, H // G, P, 1)
    hv.add_(xdt * B.float().view(b, G, 1, 1, N))
    return (hv @ C.float().view(b, G, 1, N, 1)).view(b, H, P)
