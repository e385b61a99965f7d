"""Pre-norm residual block as mamba-ssm builds it: ``res = h + res; h = mixer(norm(res))``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from engine.config import MambaConfig
from engine.modules.mixer import MambaMixer
from engine.modules.mixer2 import Mamba2Mixer


class RMSNorm(nn.Module):
    """``x / rms(x) * weight``, computed in float32.

    Written out rather than ``nn.RMSNorm``: on single-row decode tensors
    torch's CPU kernel cost ~20 us more per call here (about 9% of a
    4-layer decode step, measured A/B in place).
    """

    def __init__(self, d: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True).add_(self.eps))
        return (normed * self.weight.float()).to(x.dtype)


def make_norm(config: MambaConfig, device=None, dtype=None) -> RMSNorm | nn.LayerNorm:
    """RMSNorm or LayerNorm with mamba-ssm's parameter names (``weight``[, ``bias``])."""
    if config.rms_norm:
        return RMSNorm(config.d_model, eps=config.norm_epsilon, device=device, dtype=dtype)
    return nn.LayerNorm(config.d_model, eps=config.norm_epsilon, device=device, dtype=dtype)


class Block(nn.Module):
    def __init__(self, config: MambaConfig, device=None, dtype=None):
        super().__init__()
        self.norm = make_norm(config, device, dtype)
        self.mixer: MambaMixer | Mamba2Mixer = (Mamba2Mixer if config.layer == "Mamba2" else MambaMixer)(
            config, device, dtype)
        self.residual_in_fp32 = config.residual_in_fp32

    def _pre(self, hidden: Tensor, residual: Tensor | None) -> tuple[Tensor, Tensor]:
        residual = hidden if residual is None else hidden + residual
        normed = self.norm(residual.to(self.norm.weight.dtype))
        if self.residual_in_fp32:
            residual = residual.to(torch.float32)
        return normed, residual

    def forward(
        self,
        hidden: Tensor,
        residual: Tensor | None,
        conv_state: Tensor | None,
        ssm_state: Tensor | None,
        lengths: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        normed, residual = self._pre(hidden, residual)
        hidden, conv_state, ssm_state = self.mixer(normed, conv_state, ssm_state, lengths)
        return hidden, residual, conv_state, ssm_state

    def step(self, hidden: Tensor, residual: Tensor | None, conv_state: Tensor, ssm_state: Tensor) -> tuple[Tensor, Tensor]:
        normed, residual = self._pre(hidden, residual)
        return self.mixer.step(normed, conv_state, ssm_state), residual
