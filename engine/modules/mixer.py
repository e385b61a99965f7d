"""The Mamba-1 mixer: parameter names and shapes equal mamba-ssm's ``Mamba``.

Falcon-Mamba's mixer is the same with weightless RMS norms on dt (before
``dt_proj``), B and C (``config.mixer_rms_eps``); it has no parameter of its own.

Two entry points: :meth:`MambaMixer.forward` runs a whole (right-padded)
batch of sequences from given states, :meth:`MambaMixer.step` advances one
token per sequence in place. Activations are (batch, length, features),
which is what the linear layers produce, so nothing is transposed.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine import ops
from engine.config import MambaConfig
from engine.ops import packed_linear
from engine.ops.selective_scan import LOG2E

if TYPE_CHECKING:
    from engine.quant import QuantizedLinear


def _weightless_rms_norm(x: Tensor, eps: float) -> Tensor:
    """``x / rms(x)`` over the last dim, computed in float32 and returned in ``x``'s dtype (Falcon-Mamba's norm)."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


DecayCache = tuple[tuple[int | None, int], Tensor]


def decay_rates(A_log: Tensor, scale: float, cached: DecayCache | None) -> DecayCache:
    """``(key, -exp(A_log) * scale)`` in float32: ``cached`` while ``A_log`` is unchanged, else computed anew (both
    mixers' decode steps and the fused step's pointer tables read it; each mixer keeps its own).

    Change is seen through the version counter; inference tensors have none, and are treated as frozen
    (weights are not edited mid-serving).
    """
    key = (None if A_log.is_inference() else A_log._version, A_log.data_ptr())
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, -torch.exp(A_log.float()) * scale)
    return cached


class MambaMixer(nn.Module):
    # nn.Linear as built; engine/quant.py's quantize_model swaps in QuantizedLinear (same weight/bias interface).
    in_proj: nn.Linear | QuantizedLinear
    x_proj: nn.Linear | QuantizedLinear
    dt_proj: nn.Linear | QuantizedLinear
    out_proj: nn.Linear | QuantizedLinear

    def __init__(self, config: MambaConfig, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        d_inner, d_state, dt_rank = config.d_inner, config.d_state, config.dt_rank_value
        self.d_inner, self.d_state, self.dt_rank, self.d_conv = d_inner, d_state, dt_rank, config.d_conv
        self.in_proj = nn.Linear(config.d_model, 2 * d_inner, bias=config.bias, **kw)
        self.conv1d = nn.Conv1d(
            d_inner, d_inner, config.d_conv, groups=d_inner, padding=config.d_conv - 1, bias=config.conv_bias, **kw
        )
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False, **kw)
        self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True, **kw)
        # A and D stay float32 whatever the model dtype, as in mamba-ssm.
        self.A_log = nn.Parameter(torch.empty(d_inner, d_state, device=device, dtype=torch.float32))
        self.D = nn.Parameter(torch.empty(d_inner, device=device, dtype=torch.float32))
        self.out_proj = nn.Linear(d_inner, config.d_model, bias=config.bias, **kw)
        self._config = config
        self.rms_eps = config.mixer_rms_eps  # Falcon-Mamba's norms on dt, B and C (None: Mamba-1)
        self._packed = packed_linear.PackedWeights()  # prefill's oneDNN copies of the projections (packed_linear.py)

    def _apply(self, fn, recurse: bool = True):  # .to(), .float(), ...: packed copies of the old weights go
        self._packed.clear()
        return super()._apply(fn, recurse)

    def _project(self, x: Tensor, linear: nn.Linear | QuantizedLinear, name: str, prefill: bool) -> Tensor:
        """A projection; prefill's through oneDNN with packed weights where that wins (packed_linear.py)."""
        if prefill:
            return packed_linear.linear(x, linear.weight, linear.bias, self._packed, name)
        return F.linear(x, linear.weight, linear.bias)

    @torch.no_grad()
    def reset_parameters_like_mamba_ssm(self) -> None:
        """mamba-ssm's initialisation: S4D-real A, D = 1, dt bias = softplus^-1 of log-uniform dt."""
        cfg = self._config
        A = torch.arange(1, self.d_state + 1, dtype=torch.float32, device=self.A_log.device)
        self.A_log.copy_(torch.log(A).repeat(self.d_inner, 1))
        self.D.fill_(1.0)
        std = self.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(
            torch.rand(self.d_inner, device=self.A_log.device) * (math.log(cfg.dt_max) - math.log(cfg.dt_min))
            + math.log(cfg.dt_min)
        ).clamp(min=cfg.dt_init_floor)
        assert self.dt_proj.bias is not None  # built with bias=True
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def _ssm_inputs(self, x: Tensor, softplus: bool = True, prefill: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """dt (after softplus, or before it with ``softplus=False``), B, C from the conv output x (..., d_inner)."""
        dbc = self._project(x, self.x_proj, "x_proj", prefill)
        dt, B, C = torch.split(dbc, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        if self.rms_eps is not None:
            dt, B, C = (_weightless_rms_norm(t, self.rms_eps) for t in (dt, B, C))
        dt = self._project(dt, self.dt_proj, "dt_proj", prefill).float()
        return (F.softplus(dt) if softplus else dt), B, C

    def forward(
        self,
        hidden: Tensor,
        conv_state: Tensor | None = None,
        ssm_state: Tensor | None = None,
        lengths: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """hidden (b, L, d_model) -> (out (b, L, d_model), new conv state, new ssm state).

        ``lengths`` marks right padding: steps past a row's length leave its
        state untouched, so the returned states are those after its last token.
        """
        x, z = self._project(hidden, self.in_proj, "in_proj", prefill=True).chunk(2, dim=-1)
        conv_w = self.conv1d.weight.squeeze(1)
        x, new_conv = ops.conv(x, conv_w, self.conv1d.bias, conv_state, lengths)
        dt, B, C = self._ssm_inputs(x, softplus=False, prefill=True)  # the scan applies softplus and the padding
        A = -torch.exp(self.A_log.float())
        y, new_ssm = ops.ssm_scan(x, dt, A, B, C, self.D, z, ssm_state, dt_softplus=True, lengths=lengths)
        return self._project(y.to(hidden.dtype), self.out_proj, "out_proj", prefill=True), new_conv, new_ssm

    def _A_for_decode(self) -> Tensor:
        """-exp(A_log) * log2(e) (the exp2 form), cached until the parameter changes."""
        self._A_cache = decay_rates(self.A_log, LOG2E, getattr(self, "_A_cache", None))
        return self._A_cache[1]

    def step(self, hidden: Tensor, conv_state: Tensor, ssm_state: Tensor) -> Tensor:
        """hidden (b, d_model) -> out (b, d_model); both states advance in place.

        Called once per layer per generated token, so it calls the functional
        ops directly rather than going through submodule ``__call__``.
        """
        x, z = F.linear(hidden, self.in_proj.weight, self.in_proj.bias).chunk(2, dim=-1)
        x = ops.conv_step(x, conv_state, self.conv1d.weight.squeeze(1), self.conv1d.bias)
        dt, B, C = self._ssm_inputs(x)
        y = ops.ssm_step(ssm_state, x, dt, self._A_for_decode(), B, C, self.D, z)
        return F.linear(y, self.out_proj.weight, self.out_proj.bias)
