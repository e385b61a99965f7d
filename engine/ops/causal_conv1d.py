"""Pure-PyTorch depthwise causal conv1d with a carried window, plus its step.

The conv state holds the last ``d_conv`` inputs of each channel, newest at
index -1 (mamba-ssm's layout, (b, D, K)), so a prefill can continue where an
earlier prefill or decode stopped. Prefill works on (b, L, D) activations,
the layout the linear layers produce: with K = 4 taps, K shifted
multiply-adds are cheaper than transposing twice around ``F.conv1d``.
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
        x: (b, L, D) inputs.
        weight: (D, K); bias: (D,) or None.
        conv_state: (b, D, K) window before the first input, or None (zeros).
        lengths: (b,) real length of each row; positions past it are padding.

    Returns:
        out: (b, L, D) = silu(conv(x)).
        new_state: (b, D, K), the K inputs ending at each row's last real one.
    """
    b, L, D = x.shape
    K = weight.shape[-1]
    window = time_window(x, conv_state, K)  # (b, K + L, D)
    out = window[:, 1 : 1 + L] * weight[:, 0]
    for k in range(1, K):
        out = torch.addcmul(out, window[:, 1 + k : 1 + k + L], weight[:, k])
    if bias is not None:
        out = out + bias
    return F.silu(out), last_window(window, lengths, K)


def time_window(x: Tensor, conv_state: Tensor | None, K: int) -> Tensor:
    """(b, K + L, D): the carried K inputs followed by the new ones."""
    if conv_state is None:
        return F.pad(x, (0, 0, K, 0))
    return torch.cat([conv_state.transpose(1, 2).to(x.dtype), x], dim=1)


def last_window(window: Tensor, lengths: Tensor | None, K: int) -> Tensor:
    """The K rows of ``window`` (b, K + L, D) ending at each row's length, as (b, D, K)."""
    if lengths is None:
        return window[:, -K:].transpose(1, 2).contiguous()
    idx = lengths.to(window.device).view(-1, 1, 1) + torch.arange(K, device=window.device).view(1, K, 1)
    return torch.gather(window, 1, idx.expand(-1, -1, window.shape[2])).transpose(1, 2).contiguous()


def next_state(x: Tensor, conv_state: Tensor | None, lengths: Tensor | None, K: int) -> Tensor:
    """``last_window`` without building the (b, K + L, D) window: the K inputs ending at each row's length,
    taken from x or, for a row shorter than K, partly from the carried state (zeros if None); (b, D, K)."""
    b, L, D = x.shape
    ends = torch.full((b,), L, device=x.device) if lengths is None else lengths.to(x.device)
    pos = ends.view(-1, 1) - K + torch.arange(K, device=x.device).view(1, K)  # (b, K) positions in x
    from_x = torch.gather(x, 1, pos.clamp(0, max(L - 1, 0)).unsqueeze(-1).expand(-1, -1, D)) if L else None
    if conv_state is None:
        carried = x.new_zeros(b, K, D)
    else:
        carried = torch.gather(conv_state.transpose(1, 2).to(x.dtype), 1,
                               (pos + K).clamp(0, K - 1).unsqueeze(-1).expand(-1, -1, D))
    window = carried if from_x is None else torch.where((pos >= 0).unsqueeze(-1), from_x, carried)
    return window.transpose(1, 2).contiguous()


def causal_conv1d_step(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """One decode step: shift ``conv_state`` (b, D, K) in place, return silu(conv) (b, D)."""
    window = torch.cat([conv_state[..., 1:], x.unsqueeze(-1).to(conv_state.dtype)], dim=-1)
    conv_state.copy_(window)
    out = torch.linalg.vecdot(window, weight)
    return F.silu(out if bias is None else out + bias)
