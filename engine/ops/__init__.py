"""Mamba ops with one entry point each: CUDA kernels when present, pure PyTorch otherwise.

The mixers call only these functions (and ``packed_linear.linear`` for their
prefill projections): ``ssm_scan`` / ``ssm_step`` for Mamba-1, ``ssd_scan`` /
``ssd_step`` for Mamba-2, ``conv`` / ``conv_step`` for both. So the pure path
and the kernel path share every line above the op level.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.ops import cpu_fused, kernels
from engine.ops.causal_conv1d import causal_conv1d as _causal_conv1d_pure
from engine.ops.causal_conv1d import causal_conv1d_step, last_window, next_state, time_window
from engine.ops.selective_scan import LOG2E, initial_state_contribution, selective_state_step
from engine.ops.selective_scan import selective_scan as _selective_scan_pure
from engine.ops.ssd import ssd_scan as _ssd_scan_pure
from engine.ops.ssd import ssd_step as _ssd_step_pure


def ssm_scan(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor,
    z: Tensor,
    h0: Tensor | None,
    dt_softplus: bool = False,
    lengths: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``out = (scan(x) + D * x) * silu(z)`` over (b, L, ·) inputs; returns (out, last state).

    dt is final (softplus applied, zero on padding), or, with ``dt_softplus``,
    before its softplus and padding past each row's ``lengths`` (the fused CPU
    scan does both in its one pass). mamba-ssm's kernel only scans from a
    zero state, so a start state is added by linearity.
    """
    if dt_softplus and not kernels.ssm_kernels_for(x):
        fused = cpu_fused.selective_scan(x, dt, A * LOG2E, B, C, D, z, h0, dt_softplus=True, lengths=lengths)
        if fused is not None:
            return fused[0].to(x.dtype), fused[1]
    if dt_softplus:
        dt = F.softplus(dt)
        if lengths is not None:
            valid = torch.arange(dt.shape[1], device=dt.device) < lengths.to(dt.device).unsqueeze(1)
            dt = dt * valid.unsqueeze(-1)
    if kernels.ssm_kernels_for(x):
        assert kernels.selective_scan_fn is not None  # ssm_kernels_for checked it (CUDA path only)
        out, h_last = kernels.selective_scan_fn(
            x.transpose(1, 2).contiguous(),
            dt.transpose(1, 2).contiguous(),
            A,
            B.transpose(1, 2).contiguous(),
            C.transpose(1, 2).contiguous(),
            D.float(),
            z.transpose(1, 2).contiguous(),
            delta_softplus=False,
            return_last_state=True,
        )
        out = out.transpose(1, 2)
        h_last = h_last.float()
        if h0 is not None:
            y_extra, h_extra = initial_state_contribution(dt, A, C, h0)
            out = out + (y_extra * F.silu(z.float())).to(out.dtype)
            h_last = h_last + h_extra
        return out, h_last
    fused = cpu_fused.selective_scan(x, dt, A * LOG2E, B, C, D, z, h0)
    if fused is not None:
        return fused[0].to(x.dtype), fused[1]
    y, h_last = _selective_scan_pure(x, dt, A, B, C, h0)
    out = (y + x.float() * D.float()) * F.silu(z.float())
    return out.to(x.dtype), h_last


def ssm_step(h: Tensor, x: Tensor, dt: Tensor, A2: Tensor, B: Tensor, C: Tensor, D: Tensor, z: Tensor) -> Tensor:
    """One decode step on (b, ·) inputs; ``h`` (b, D, N) advances in place. ``A2 = A * log2(e)``."""
    if kernels.ssm_kernels_for(x):
        assert kernels.selective_state_update is not None  # ssm_kernels_for checked it (CUDA path only)
        return kernels.selective_state_update(h, x, dt, A2 / LOG2E, B, C, D.float(), z=z)
    x32 = x.float()
    y = selective_state_step(h, x32, dt, A2, B.float(), C.float())
    return (torch.addcmul(y, x32, D) * F.silu(z.float())).to(x.dtype)


# The pure SSD scan's chunk at most: the result is the same for any chunk (up to float rounding) and the kernels
# use the config's (256 for the released models), but on CPU the within-chunk Q x Q part grows with the chunk:
# 130M-shaped layers over 2048 tokens took 28-61 ms at 128 against 59-94 ms at 256 (2 threads, loadtest figures).
CPU_SSD_CHUNK = 128


def ssd_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, chunk_size: int,
             h0: Tensor | None) -> tuple[Tensor, Tensor]:
    """Mamba-2's scan plus the D skip over x (b, L, H, P), dt (b, L, H) final (bias, softplus, clamp, zero on
    padding), A (H,), B/C (b, L, G, N), D (H,); returns (y (b, L, H, P) float32, last state (b, H, P, N) float32)."""
    if kernels.ssd_kernels_for(x):
        assert kernels.mamba_chunk_scan_combined is not None  # ssd_kernels_for checked it (CUDA path only)
        y, h_last = kernels.mamba_chunk_scan_combined(
            x.contiguous(), dt.contiguous(), A, B.contiguous(), C.contiguous(), chunk_size, D=D.float(),
            initial_states=None if h0 is None else h0.float().contiguous(), return_final_states=True,
        )  # dt is final: no dt_bias, no softplus, and the default dt_limit does not clamp
        return y.float(), h_last.float()
    y, h_last = _ssd_scan_pure(x, dt, A, B, C, min(chunk_size, CPU_SSD_CHUNK), h0)
    return y + x.float() * D.float().view(-1, 1), h_last


def ssd_step(h: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor) -> Tensor:
    """One Mamba-2 decode step plus the D skip; ``h`` (b, H, P, N) float32 advances in place. x (b, H, P),
    dt (b, H) final, A (H,), B/C (b, G, N), D (H,); returns y (b, H, P) float32."""
    if kernels.ssd_kernels_for(x):
        assert kernels.selective_state_update is not None  # ssd_kernels_for checked it (CUDA path only)
        _, H, P, N = h.shape
        return kernels.selective_state_update(  # per-head values broadcast over p (and n) as mamba-ssm passes them
            h, x, dt.unsqueeze(-1).expand(-1, -1, P), A.float().view(H, 1, 1).expand(H, P, N), B, C,
            D.float().view(H, 1).expand(H, P),
        ).float()
    fused = cpu_fused.ssd_step(h, x, dt, A, B, C, D)
    if fused is not None:
        return fused
    y = _ssd_step_pure(h, x, dt, A, B, C)
    return y + x.float() * D.float().view(-1, 1)


def conv(
    x: Tensor, weight: Tensor, bias: Tensor | None, conv_state: Tensor | None, lengths: Tensor | None
) -> tuple[Tensor, Tensor]:
    """silu(causal depthwise conv) over (b, L, D), continuing ``conv_state``; returns (out, new state)."""
    if kernels.conv_kernels_for(x):
        K = weight.shape[-1]
        window = time_window(x, conv_state, K)  # (b, K + L, D)
        assert kernels.causal_conv1d_fn is not None  # conv_kernels_for checked it (CUDA path only)
        out = kernels.causal_conv1d_fn(window[:, 1:].transpose(1, 2).contiguous(), weight, bias, activation="silu")
        return out[..., K - 1 :].transpose(1, 2), last_window(window, lengths, K)
    fused = cpu_fused.causal_conv(x, weight, bias, conv_state)
    if fused is not None:
        return fused, next_state(x, conv_state, lengths, weight.shape[-1])
    return _causal_conv1d_pure(x, weight, bias, conv_state, lengths)


def conv_step(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """One decode step on (b, D); ``conv_state`` (b, D, K) shifts in place."""
    if kernels.conv_kernels_for(x):
        assert kernels.causal_conv1d_update is not None  # conv_kernels_for checked it (CUDA path only)
        return kernels.causal_conv1d_update(x, conv_state, weight, bias, activation="silu")
    return causal_conv1d_step(x, conv_state, weight, bias)


__all__ = ["conv", "conv_step", "cpu_fused", "kernels", "ssd_scan", "ssd_step", "ssm_scan", "ssm_step"]
