"""The planner's networks: latent dynamics, policy and value heads on Mamba SSM states.

Everything here reads and writes the SSM state the engine keeps, in its
layout ``(n_layer, batch, d_inner, d_state)`` (:class:`~engine.state.MambaState`),
so a state the dynamics model predicts can be blended into a live session as
is. It is a model over the engine's state, like the LM, so it lives beside it
in the engine: the training stages (:mod:`engine.train`) build it from the
engine alone, and the search (``planner/``) runs it.

Design (why not one dense MLP over the whole state):

- **Dynamics** copies Mamba's own update, ``h' = exp(dt * A) * h + (dt * x) B``
  per layer, with the decay ``A`` initialised from the backbone. What a real
  step computes through every layer in sequence (the layer inputs ``dt``, ``x``
  and ``B``) is predicted here for *all layers at once* from the token's
  embedding and a small summary of the current state, with one batched matmul
  over layers. Its cost is the elementwise state update plus low-rank
  projections: a fraction of a backbone step, and no sequential dependence
  between layers.
- **Features**: each layer's state is read out with a learned vector over
  ``d_state`` (as Mamba's ``C`` does) and RMS-normalised: ``(batch, n_layer,
  d_inner)``. Policy, value and the dynamics' context all share it, so a leaf
  is read once.
- **Policy**: a low-rank map from the features to next-token logits, used at
  nodes below the root (the root uses the backbone's real logits).
- **Value**: one small head per layer, each a ``tanh`` in ``[-1, 1]``; the
  value is their consensus ``mean - value_std_penalty * std`` (CRSM's rule).
  Layers see different time scales; their disagreement is a cheap
  uncertainty estimate, and the penalty keeps the search from chasing a
  state that only one layer likes. The range ``[-1, 1]`` is what the search
  normalises Q with.

A freshly initialised net (no training) is well defined: the dynamics start
as "decay the state" (small inputs), the policy near uniform, values near 0.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.config import MambaConfig
from engine.models.mamba_lm import MambaLMHeadModel

LOG2E = math.log2(math.e)
PLANNER_PREFIX = "planner."
PLANNER_CONFIG_FILE = "planner.json"


@dataclass(frozen=True)
class PlannerConfig:
    n_layer: int
    d_inner: int
    d_state: int
    vocab_size: int
    d_token: int = 32  # token embedding width of the dynamics input
    d_summary: int = 8  # per-layer state summary width (dynamics context)
    d_policy: int = 32
    d_value: int = 32
    value_std_penalty: float = 0.1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PlannerConfig":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class Evaluation:
    """What the network says about a batch of states."""

    logits: Tensor  # (b, vocab)
    value: Tensor  # (b,) consensus in [-1, 1]
    layer_values: Tensor  # (b, n_layer)


def _channel_decay_log(A_log: Tensor, cfg: MambaConfig) -> Tensor:
    """A layer's log decay rates as (d_inner, d_state): Mamba-1's own, or Mamba-2's one per head spread over its
    headdim channels and every state index (the net's dynamics is Mamba-1-shaped; it starts where the layer is)."""
    A_log = A_log.detach().float()
    if A_log.dim() == 2:
        return A_log
    return A_log.repeat_interleave(cfg.headdim).unsqueeze(1).expand(-1, cfg.d_state).contiguous()


class PlannerNet(nn.Module):
    def __init__(self, config: PlannerConfig, A_log: Tensor | None = None):
        super().__init__()
        self.config = c = config
        L, D, N = c.n_layer, c.d_inner, c.d_state
        if A_log is None:  # S4D-real initialisation, as a fresh Mamba layer has
            A_log = torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(L, D, 1)
        self.A_log = nn.Parameter(A_log.detach().float().clone().reshape(L, D, N))
        self.readout = nn.Parameter(torch.full((L, N, 1), 1.0 / math.sqrt(N)))
        # Dynamics: token embedding + state summary -> per-layer (dt, x, B).
        self.token_embedding = nn.Parameter(torch.randn(c.vocab_size, c.d_token) * 0.02)
        self.summary = nn.Parameter(torch.randn(L, D, c.d_summary) / math.sqrt(D))
        self.context = nn.Parameter(torch.randn(L * c.d_summary, L * c.d_token) * 0.02)
        self.layer_bias = nn.Parameter(torch.zeros(L, 1, c.d_token))
        self.out_weight = nn.Parameter(torch.randn(L, c.d_token, 2 * D + N) * 0.02)
        self.out_bias = nn.Parameter(torch.zeros(L, 1, 2 * D + N))
        dt = torch.exp(torch.rand(L, 1, D) * (math.log(0.1) - math.log(0.001)) + math.log(0.001))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1, as Mamba initialises dt
        # Policy: features of all layers -> low rank -> logits.
        self.policy_in = nn.Linear(L * D, c.d_policy)
        self.policy_out = nn.Linear(c.d_policy, c.vocab_size)
        nn.init.normal_(self.policy_out.weight, std=0.02)
        nn.init.zeros_(self.policy_out.bias)
        # Value: one small head per layer.
        self.value_w1 = nn.Parameter(torch.randn(L, D, c.d_value) / math.sqrt(D))
        self.value_b1 = nn.Parameter(torch.zeros(L, 1, c.d_value))
        self.value_w2 = nn.Parameter(torch.randn(L, 1, c.d_value) * 0.02)
        self.value_b2 = nn.Parameter(torch.zeros(L, 1))

    @classmethod
    def for_backbone(cls, model: MambaLMHeadModel, **overrides: Any) -> "PlannerNet":
        """A fresh (untrained) net shaped for ``model``, with its decay rates ``A`` copied."""
        cfg = model.config
        config = PlannerConfig(cfg.n_layer, cfg.d_inner, cfg.d_state, cfg.vocab_size, **overrides)
        A_log = torch.stack([_channel_decay_log(layer.mixer.A_log, cfg) for layer in model.backbone.layers])
        return cls(config, A_log)

    # Pieces (states are (n_layer, b, d_inner, d_state), the engine's layout) ----------
    def features(self, ssm: Tensor) -> Tensor:
        """(L, b, D, N) -> (L, b, D): each layer read out over d_state, RMS-normalised."""
        L, b, D, N = ssm.shape
        # One matrix-vector product per layer: faster on CPU than a batched GEMM with one output column.
        r = torch.stack([torch.mv(ssm[i].reshape(b * D, N), self.readout[i, :, 0]) for i in range(L)]).view(L, b, D)
        return r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + 1e-6)

    def evaluate(self, ssm: Tensor, features: Tensor | None = None) -> Evaluation:
        f = self.features(ssm) if features is None else features
        b = f.shape[1]
        logits = self.policy_out(F.silu(self.policy_in(f.transpose(0, 1).reshape(b, -1))))
        value, layer_values = self.values(f)
        return Evaluation(logits, value, layer_values)

    def values(self, f: Tensor) -> tuple[Tensor, Tensor]:
        """Consensus value (b,) and per-layer values (b, n_layer) from features (n_layer, b, d_inner)."""
        L = f.shape[0]
        hidden = F.silu(torch.baddbmm(self.value_b1, f, self.value_w1))
        layer_values = torch.tanh((hidden * self.value_w2).sum(-1) + self.value_b2).t()  # (b, L)
        if L > 1:
            std = layer_values.std(-1, unbiased=False)
        else:
            std = torch.zeros_like(layer_values[:, 0])
        value = (layer_values.mean(-1) - self.config.value_std_penalty * std).clamp(-1.0, 1.0)
        return value, layer_values

    def dynamics(self, ssm: Tensor, tokens: Tensor, features: Tensor | None = None) -> Tensor:
        """Predicted next state (L, b, D, N) after feeding ``tokens`` (b,) from ``ssm``."""
        c = self.config
        f = self.features(ssm) if features is None else features
        L, b, D, N = ssm.shape
        summary = torch.bmm(f, self.summary).transpose(0, 1).reshape(b, -1)  # (b, L * d_summary)
        context = (summary @ self.context).view(b, L, c.d_token).transpose(0, 1)
        u = F.silu(self.token_embedding[tokens].unsqueeze(0) + context + self.layer_bias)
        out = torch.baddbmm(self.out_bias, u, self.out_weight)  # (L, b, 2D + N)
        dt_raw, x, B = torch.split(out, [D, D, N], dim=-1)
        dt = F.softplus(dt_raw + self.dt_bias)
        decay = dt.unsqueeze(-1) * (torch.exp(self.A_log) * -LOG2E).unsqueeze(1)
        if torch.is_grad_enabled():  # training (engine.train.dynamics): out of place, for autograd
            return torch.exp2(decay) * ssm + (dt * x).unsqueeze(-1) * B.unsqueeze(-2)
        nxt = decay.exp2_().mul_(ssm)  # exp(dt A) * h; exp2 is several times faster than exp on CPU
        nxt.view(L * b, D, N).baddbmm_((dt * x).reshape(L * b, D, 1), B.reshape(L * b, 1, N))  # + (dt x) B
        return nxt

    def forward(self, ssm: Tensor, tokens: Tensor) -> tuple[Tensor, Evaluation]:
        """One recurrent inference (MuZero's g then f): next state and what the net says about it."""
        nxt = self.dynamics(ssm, tokens)
        return nxt, self.evaluate(nxt)

    # Storage ------------------------------------------------------------
    def checkpoint_tensors(self) -> dict[str, Tensor]:
        return {PLANNER_PREFIX + k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}

    def checkpoint_files(self, record: dict[str, Any] | None = None) -> dict[str, bytes]:
        body = {"config": self.config.to_dict(), "record": dict(record or {})}
        return {PLANNER_CONFIG_FILE: (json.dumps(body, indent=2) + "\n").encode()}

    @classmethod
    def from_tensors(cls, body: dict[str, Any], tensors: dict[str, Tensor]) -> "PlannerNet":
        net = cls(PlannerConfig.from_dict(body["config"]))
        state = {k[len(PLANNER_PREFIX):]: v for k, v in tensors.items() if k.startswith(PLANNER_PREFIX)}
        net.load_state_dict(state, strict=True)
        return net


@dataclass
class LoadedPlanner:
    net: PlannerNet
    trained: bool  # False: freshly initialised for this backbone (no planner weights in the checkpoint)
    record: dict[str, Any]


def load_planner(directory: str | Any, backbone: MambaLMHeadModel) -> LoadedPlanner:
    """The planner net stored with a checkpoint (``planner.json`` + ``planner.*`` tensors), else a fresh one.

    The checkpoint's manifest is verified by :func:`engine.checkpoint.load_model`; this only reads.
    """
    from pathlib import Path

    from safetensors import safe_open

    from engine.checkpoint import WEIGHTS, CheckpointError

    directory = Path(directory)
    body_path = directory / PLANNER_CONFIG_FILE
    if not body_path.is_file():
        return LoadedPlanner(PlannerNet.for_backbone(backbone), trained=False, record={})
    try:
        body = json.loads(body_path.read_text(encoding="utf-8"))
        with safe_open(str(directory / WEIGHTS), framework="pt") as fh:
            tensors = {k: fh.get_tensor(k) for k in fh.keys() if k.startswith(PLANNER_PREFIX)}
        net = PlannerNet.from_tensors(body, tensors)
    except Exception as exc:  # whatever a malformed file raises, it is this file's fault: name it
        raise CheckpointError(f"{body_path}: the planner does not load ({type(exc).__name__}: {exc})") from exc
    cfg = backbone.config
    if (net.config.n_layer, net.config.d_inner, net.config.d_state) != (cfg.n_layer, cfg.d_inner, cfg.d_state):
        raise CheckpointError(f"{directory}: planner shapes {net.config} do not fit the backbone")
    return LoadedPlanner(net.eval(), trained=True, record=body.get("record", {}))
