"""Pure-PyTorch depthwise causal conv1d with a carried window, plus its step.

The conv state holds the last ``d_conv`` inputs of each channel, newest at
index -1 (mamba-ssm's layout), so a prefill can continue where an earlier
prefill or decode stopped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def causal_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    conv_state: Tensor | None = None,
    lengths: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Causal depthwise conv + SiLU over a (right-padded) batch.

    Args:
        x: (b, D, L) inputs.
        weight: (D, K); bias: (D,) or None.
        conv_state: (b, D, K) window before the first input, or None (zeros).
        lengths: (b,) real length of each row; positions past it are padding.

    Returns:
        out: (b, D, L) = silu(conv(x)).
        new_state: (b, D, K), the K inputs ending at each row's last real one.
    """
    b, D, L = x.shape
    K = weight.shape[-1]
    if conv_state is None:
        conv_state = x.new_zeros(b, D, K)
    window = torch.cat([conv_state.to(x.dtype), x], dim=-1)  # (b, D, K + L)
    out = F.conv1d(window[..., 1:], weight.unsqueeze(1), bias, groups=D)
    new_state = last_window(window, lengths, K)
    return F.silu(out), new_state


def last_window(window: Tensor, lengths: Tensor | None, K: int) -> Tensor:
    """The K columns of ``window`` (b, D, K + L) that end at each row's length."""
    if lengths is None:
        return window[..., -K:].clone()
    idx = lengths.to(window.device).view(-1, 1, 1) + torch.arange(K, device=window.device)
    return torch.gather(window, 2, idx.expand(-1, window.shape[1], -1))


def causal_conv1d_step(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """One decode step: shift ``conv_state`` (b, D, K) in place, return silu(conv) (b, D)."""
    window = torch.cat([conv_state[..., 1:], x.unsqueeze(-1).to(conv_state.dtype)], dim=-1)
    conv_state.copy_(window)
    out = torch.linalg.vecdot(window, weight)
    return F.silu(out if bias is None else out + bias)
