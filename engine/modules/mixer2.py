"""The Mamba-2 mixer: parameter names and shapes equal mamba-ssm's ``Mamba2`` and transformers' ``Mamba2Mixer``.

``in_proj`` makes [z, x, B, C, dt] in one matmul; a causal depthwise conv (with
SiLU) runs over x, B and C together; the SSD scan (engine/ops/ssd.py) uses
dt = softplus(dt + dt_bias) clamped to ``dt_limit``, a scalar ``A`` per head and
``D`` per head; a gated RMSNorm (per group of ``d_inner / ngroups`` channels)
precedes ``out_proj``.

The same two entry points as :class:`~engine.modules.mixer.MambaMixer`, with
the same state arguments: a conv window (b, d_inner + 2 * ngroups * d_state,
d_conv) and an SSM state (b, d_inner, d_state), which is the (b, nheads,
headdim, d_state) state of mamba-ssm with the heads laid end to end, so the
engine's state stacks, batches and stores treat both mixers alike.

One difference from both references, on purpose: they clamp dt to
``dt_limit`` in prefill but not in their decode step; here both clamp, so a
token decoded one at a time gives the same state as the same token read in a
prompt (what sessions and the prefix cache rely on). With the default limit
(0, inf) nothing changes.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine import ops
from engine.config import MambaConfig
from engine.modules.mixer import decay_rates
from engine.ops import cpu_fused, packed_linear

if TYPE_CHECKING:
    from engine.quant import QuantizedLinear


class GatedRMSNorm(nn.Module):
    """mamba-ssm's ``RMSNormGated``: RMS over groups of ``group_size`` channels, with ``silu(z)`` applied before
    the norm (``norm_before_gate=False``, the default) or after it; computed in float32."""

    def __init__(self, d: int, group_size: int, eps: float, norm_before_gate: bool, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d, device=device, dtype=dtype))
        self.group_size, self.eps, self.norm_before_gate = group_size, eps, norm_before_gate

    def forward(self, y: Tensor, z: Tensor) -> Tensor:
        y32, gate = y.float(), F.silu(z.float())
        if not self.norm_before_gate:
            y32 = y32 * gate
        groups = y32.view(*y32.shape[:-1], -1, self.group_size)
        y32 = (groups * torch.rsqrt(groups.square().mean(-1, keepdim=True) + self.eps)).view_as(y32)
        y32 = y32 * self.weight.float()
        if self.norm_before_gate:
            y32 = y32 * gate
        return y32.to(y.dtype)


class Mamba2Mixer(nn.Module):
    in_proj: nn.Linear | QuantizedLinear  # engine/quant.py's quantize_model swaps in QuantizedLinear
    out_proj: nn.Linear | QuantizedLinear

    def __init__(self, config: MambaConfig, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        d_inner, d_state, heads, groups = config.d_inner, config.d_state, config.nheads, config.ngroups
        self.d_inner, self.d_state, self.d_conv = d_inner, d_state, config.d_conv
        self.nheads, self.headdim, self.ngroups, self.chunk_size = heads, config.headdim, groups, config.chunk_size
        self.conv_channels = config.conv_channels
        self.dt_limit = config.dt_limit
        self._clamps = config.dt_limit != (0.0, math.inf)
        self.in_proj = nn.Linear(config.d_model, 2 * d_inner + 2 * groups * d_state + heads, bias=config.bias, **kw)
        self.conv1d = nn.Conv1d(self.conv_channels, self.conv_channels, config.d_conv, groups=self.conv_channels,
                                padding=config.d_conv - 1, bias=config.conv_bias, **kw)
        # A, D and the dt bias are per head; A and D stay float32 whatever the model dtype, as in mamba-ssm.
        self.dt_bias = nn.Parameter(torch.empty(heads, **kw))
        self.A_log = nn.Parameter(torch.empty(heads, device=device, dtype=torch.float32))
        self.D = nn.Parameter(torch.empty(heads, device=device, dtype=torch.float32))
        self.norm = GatedRMSNorm(d_inner, d_inner // groups, config.norm_epsilon, config.norm_before_gate, **kw)
        self.out_proj = nn.Linear(d_inner, config.d_model, bias=config.bias, **kw)
        self._config = config
        self._packed = packed_linear.PackedWeights()  # prefill's oneDNN copies of the projections (packed_linear.py)

    def _apply(self, fn, recurse: bool = True):  # .to(), .float(), ...: packed copies of the old weights go
        self._packed.clear()
        return super()._apply(fn, recurse)

    @torch.no_grad()
    def reset_parameters_like_mamba_ssm(self) -> None:
        """mamba-ssm's initialisation: A uniform in [1, 16] per head, D = 1, dt bias = softplus^-1 of log-uniform dt."""
        cfg = self._config
        self.A_log.copy_(torch.empty_like(self.A_log).uniform_(1, 16).log())
        self.D.fill_(1.0)
        log_span = math.log(cfg.dt_max) - math.log(cfg.dt_min)
        dt = torch.exp(torch.rand(self.nheads, device=self.dt_bias.device) * log_span + math.log(cfg.dt_min))
        dt = dt.clamp(min=cfg.dt_init_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def _A_for_decode(self) -> Tensor:
        """-exp(A_log) (H,) float32, cached until the parameter changes."""
        self._A_cache = decay_rates(self.A_log, 1.0, getattr(self, "_A_cache", None))
        return self._A_cache[1]

    def _split(self, zxbcdt: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        z, xbc, dt = torch.split(zxbcdt, [self.d_inner, self.conv_channels, self.nheads], dim=-1)
        return z, xbc, dt

    def _dt(self, dt: Tensor) -> Tensor:
        """softplus(dt + dt_bias), clamped to ``dt_limit``, in float32."""
        dt = F.softplus(dt.float() + self.dt_bias.float())
        return dt.clamp(*self.dt_limit) if self._clamps else dt

    def _xbc(self, xbc: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The conv output (..., conv_channels) as x (..., H, P) and B, C (..., G, N)."""
        x, B, C = torch.split(xbc, [self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        lead = x.shape[:-1]
        return (x.reshape(*lead, self.nheads, self.headdim), B.reshape(*lead, self.ngroups, self.d_state),
                C.reshape(*lead, self.ngroups, self.d_state))

    def forward(
        self,
        hidden: Tensor,
        conv_state: Tensor | None = None,
        ssm_state: Tensor | None = None,
        lengths: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """hidden (b, L, d_model) -> (out (b, L, d_model), new conv state, new ssm state (b, d_inner, d_state)).

        ``lengths`` marks right padding: steps past a row's length leave its state untouched.
        """
        b, L, _ = hidden.shape
        zxbcdt = packed_linear.linear(hidden, self.in_proj.weight, self.in_proj.bias, self._packed, "in_proj")
        z, xbc, dt = self._split(zxbcdt)
        xbc, new_conv = ops.conv(xbc, self.conv1d.weight.squeeze(1), self.conv1d.bias, conv_state, lengths)
        x, B, C = self._xbc(xbc)
        dt = self._dt(dt)
        if lengths is not None:
            dt = dt * (torch.arange(L, device=dt.device) < lengths.to(dt.device).unsqueeze(1)).unsqueeze(-1)
        h0 = None if ssm_state is None else ssm_state.view(b, self.nheads, self.headdim, self.d_state)
        y, h_last = ops.ssd_scan(x, dt, -torch.exp(self.A_log.float()), B, C, self.D, self.chunk_size, h0)
        y = self.norm(y.reshape(b, L, self.d_inner), z)
        out = packed_linear.linear(y.to(hidden.dtype), self.out_proj.weight, self.out_proj.bias, self._packed,
                                   "out_proj")
        return out, new_conv, h_last.reshape(b, self.d_inner, self.d_state)

    @staticmethod
    def _step_linear(x: Tensor, linear: nn.Linear | QuantizedLinear) -> Tensor:
        """A decode step's projection: float32 weights through the fused CPU GEMV (prefetching the next rows; torch's
        ran at about half the memory bandwidth at batch 1), anything else through ``F.linear`` (engine/quant.py's
        layers reach the same library from there)."""
        weight = linear.weight
        if type(weight) is nn.Parameter or type(weight) is Tensor:
            fused = cpu_fused.linear(x, weight, None, linear.bias)
            if fused is not None:
                return fused
        return F.linear(x, weight, linear.bias)

    def step(self, hidden: Tensor, conv_state: Tensor, ssm_state: Tensor) -> Tensor:
        """hidden (b, d_model) -> out (b, d_model); both states advance in place."""
        b = hidden.shape[0]
        z, xbc, dt = self._split(self._step_linear(hidden, self.in_proj))
        xbc = ops.conv_step(xbc, conv_state, self.conv1d.weight.squeeze(1), self.conv1d.bias)
        x, B, C = self._xbc(xbc)
        h = ssm_state.view(b, self.nheads, self.headdim, self.d_state)
        y = ops.ssd_step(h, x, self._dt(dt), self._A_for_decode(), B, C, self.D)
        y = self.norm(y.reshape(b, self.d_inner), z)
        return self._step_linear(y.to(hidden.dtype), self.out_proj)
