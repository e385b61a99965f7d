"""Stage 2: distil the frozen backbone into the planner's latent dynamics and policy head.

The frozen backbone reads text (and task problems) one token at a time
through the engine's own decode step, :meth:`MambaLMHeadModel.step`, so the
states it records are exactly what a serving session holds. From a window
it yields a trajectory ``(state_t, token_t, state_{t+1})`` plus the
backbone's next-token logits at every state. Collection is online (a fresh
batch per update), so nothing of several GB is stored.

Losses, for an unroll of ``unroll`` steps from a true state along the true
tokens (MuZero-style, so errors that compound over a search path are
trained against):

- dynamics: per layer, ``||h'_{t+k} - h_{t+k}||^2 / ||h_{t+k} - h_{t+k-1}||^2``
  (squared error normalised by that layer's true one-step change, so slow
  and fast layers count alike; predicting "no change" scores about 1);
- policy: KL from the backbone's next-token distribution at the true state
  to the policy head's, read on the true state and on the predicted one.

Fidelity on held-out text, 1..k steps ahead, always beside the
"next state = current state" baseline: cosine of predicted vs true state,
error relative to that baseline's, and top-1 agreement of the policy head
with the backbone.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from engine import tasks
from engine.checkpoint import load_model
from engine.models import MambaLMHeadModel
from engine.models.planner_net import PLANNER_CONFIG_FILE, PlannerNet
from engine.train.common import Metrics, StageConfig, cosine_lr, load_train_state, save_train_state
from engine.train.data import load_split, sample_windows

PLANNER_WEIGHTS = "planner.safetensors"


@dataclass
class DynamicsConfig(StageConfig):
    section = "dynamics"

    out_dir: str = "runs/default"  # reads <out_dir>/backbone/checkpoint, writes <out_dir>/dynamics
    data_dir: str = "data/pydoc"
    backbone: str = ""  # a backbone checkpoint; default <out_dir>/backbone/checkpoint
    planner: dict = field(default_factory=dict)  # PlannerConfig overrides (d_token, d_summary, d_policy, ...)
    steps: int = 400
    windows: int = 16  # windows read per update
    prefix: int = 64  # tokens prefilled before recording, so states are mid-text, not fresh
    horizon: int = 32  # steps recorded per window
    pairs: int = 256  # (state, token) starts sampled per update from windows * horizon
    unroll: int = 3
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup: int = 20
    grad_clip: float = 1.0
    policy_weight: float = 1.0
    task_fraction: float = 0.3
    task_bytes: int = 1_000_000
    eval_windows: int = 32
    eval_steps_ahead: int = 4
    eval_every: int = 100
    save_every: int = 100
    seed: int = 0
    threads: int = 0

    @property
    def backbone_dir(self) -> Path:
        return Path(self.backbone) if self.backbone else Path(self.out_dir) / "backbone" / "checkpoint"


@dataclass
class Trajectory:
    ssm: torch.Tensor  # (T + 1, n_layer, b, d_inner, d_state): state before and after each recorded token
    tokens: torch.Tensor  # (T, b): token t moves ssm[t] to ssm[t + 1]
    logits: torch.Tensor  # (T + 1, b, vocab): the backbone's next-token logits at ssm[t]


@torch.inference_mode()
def collect(model: MambaLMHeadModel, ids: torch.Tensor, prefix: int) -> Trajectory:
    """Prefill ``ids[:, :prefix]``, then feed the rest one token at a time with the engine's decode step."""
    vocab = model.config.vocab_size
    logits, state = model.prefill(ids[:, :prefix])
    ssm, out = [state.ssm.float().clone()], [logits[:, :vocab].float()]
    for t in range(prefix, ids.shape[1]):
        logits = model.step(ids[:, t], state)
        ssm.append(state.ssm.float().clone())
        out.append(logits[:, :vocab].float())
    return Trajectory(torch.stack(ssm), ids[:, prefix:].t().contiguous(), torch.stack(out))


def _state(traj: Trajectory, t: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
    """States at step t + k of the sampled (t, b) starts, as (L, M, D, N)."""
    return traj.ssm[t + k, :, b].transpose(0, 1)


def layer_error(pred: torch.Tensor, true: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """Per layer: ||pred - true||^2 / ||true - prev||^2 over the batch, (L,)."""
    L = pred.shape[0]
    num = (pred - true).reshape(L, -1).pow(2).sum(-1)
    den = (true - prev).reshape(L, -1).pow(2).sum(-1).clamp_min(1e-12)
    return num / den


def kl_to(target_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    return F.kl_div(F.log_softmax(logits, -1), F.log_softmax(target_logits, -1), log_target=True,
                    reduction="batchmean")


def losses(net: PlannerNet, traj: Trajectory, starts: tuple[torch.Tensor, torch.Tensor], unroll: int) -> dict:
    t, b = starts
    pred = _state(traj, t, b, 0)
    dyn, pol = [], [kl_to(traj.logits[t, b], net.evaluate(pred).logits)]
    for k in range(1, unroll + 1):
        true = _state(traj, t, b, k)
        pred = net.dynamics(pred, traj.tokens[t + k - 1, b])
        dyn.append(layer_error(pred, true, _state(traj, t, b, k - 1)).mean())
        pol.append(kl_to(traj.logits[t + k, b], net.evaluate(pred).logits))
    return {"dynamics": torch.stack(dyn).mean(), "policy": torch.stack(pol).mean()}


def mean_cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    """Cosine of two (L, M, D, N) batches of states, per layer and sample, averaged."""
    return float(F.cosine_similarity(x.flatten(2), y.flatten(2), dim=-1).mean())


@torch.inference_mode()
def fidelity(net: PlannerNet, traj: Trajectory, steps_ahead: int) -> dict[str, dict[str, float]]:
    """Held-out fidelity, k = 1..steps_ahead, against the "next state = current state" baseline."""
    T = traj.tokens.shape[0]
    n_b = traj.ssm.shape[2]
    t = torch.arange(T - steps_ahead + 1).repeat_interleave(n_b)
    b = torch.arange(n_b).repeat(T - steps_ahead + 1)
    h0 = pred = _state(traj, t, b, 0)
    report: dict[str, dict[str, float]] = {}
    for k in range(1, steps_ahead + 1):
        pred = net.dynamics(pred, traj.tokens[t + k - 1, b])
        true = _state(traj, t, b, k)
        top = traj.logits[t + k, b].argmax(-1)

        err = (pred - true).flatten(1).norm(dim=1)
        base = (h0 - true).flatten(1).norm(dim=1).clamp_min(1e-12)
        report[str(k)] = {
            "cosine": mean_cosine(pred, true), "cosine_identity": mean_cosine(h0, true),
            "relative_error": float((err / base).mean()), "relative_error_identity": 1.0,
            "top1_policy_on_predicted": float((net.evaluate(pred).logits.argmax(-1) == top).float().mean()),
            "top1_policy_on_true": float((net.evaluate(true).logits.argmax(-1) == top).float().mean()),
            "top1_policy_on_identity": float((net.evaluate(h0).logits.argmax(-1) == top).float().mean()),
        }
    return report


def save_planner(net: PlannerNet, directory: Path, record: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    save_file(net.checkpoint_tensors(), str(directory / PLANNER_WEIGHTS))
    for name, content in net.checkpoint_files(record).items():
        (directory / name).write_bytes(content)


def load_planner_stage(directory: Path) -> tuple[PlannerNet, dict]:
    body = json.loads((directory / PLANNER_CONFIG_FILE).read_text())
    return PlannerNet.from_tensors(body, load_file(str(directory / PLANNER_WEIGHTS))), body.get("record", {})


def eval_trajectory(model: MambaLMHeadModel, cfg: DynamicsConfig) -> Trajectory:
    """Fixed held-out windows of text (the same at every evaluation)."""
    val = load_split(Path(cfg.data_dir), "val")
    ids = torch.from_numpy(sample_windows(val, None, cfg.eval_windows, cfg.prefix + cfg.horizon, 0.0,
                                         np.random.default_rng(4321)))
    return collect(model, ids, cfg.prefix)


def train(cfg: DynamicsConfig) -> Path:
    """Fit the dynamics and policy head; writes ``<out_dir>/dynamics/planner`` and returns it."""
    out = cfg.begin()
    model = load_model(cfg.backbone_dir).model.float().eval()
    net = PlannerNet.for_backbone(model, **cfg.planner)
    trained = [p for n, p in net.named_parameters() if not n.startswith("value_")]
    opt = torch.optim.AdamW(trained, lr=cfg.lr, weight_decay=0.0)
    start, meta = load_train_state(out, net, opt)
    if start >= cfg.steps and (out / "planner" / PLANNER_WEIGHTS).is_file():
        return out / "planner"  # finished earlier
    text = load_split(Path(cfg.data_dir), "train")
    stream = np.frombuffer(tasks.corpus(cfg.task_bytes, cfg.seed + 1), dtype=np.uint8) if cfg.task_fraction else None
    held_out = eval_trajectory(model, cfg)
    metrics = Metrics(out, start)
    t0 = time.time() - meta.get("wall_seconds", 0.0)  # wall time over all runs of this stage
    report: dict = {}
    for step in tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="dynamics", mininterval=10):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, cfg.steps, cfg.warmup, cfg.lr, cfg.min_lr)
        gen = np.random.default_rng([cfg.seed, step])  # per step: a resumed run sees the same data
        ids = torch.from_numpy(sample_windows(text, stream, cfg.windows, cfg.prefix + cfg.horizon, cfg.task_fraction,
                                             gen))
        traj = collect(model, ids, cfg.prefix)
        traj = Trajectory(traj.ssm.clone(), traj.tokens.clone(), traj.logits.clone())  # leave inference mode
        t = torch.from_numpy(gen.integers(0, cfg.horizon - cfg.unroll + 1, size=cfg.pairs))
        b = torch.from_numpy(gen.integers(0, cfg.windows, size=cfg.pairs))
        parts = losses(net, traj, (t, b), cfg.unroll)
        loss = parts["dynamics"] + cfg.policy_weight * parts["policy"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(trained, cfg.grad_clip)
        opt.step()
        record = {"step": step + 1, "loss": loss.item(), "dynamics_loss": parts["dynamics"].item(),
                  "policy_kl": parts["policy"].item(), "grad_norm": float(norm), "elapsed_s": time.time() - t0}
        last = step + 1 == cfg.steps
        if (step + 1) % cfg.eval_every == 0 or last:
            report = fidelity(net, held_out, cfg.eval_steps_ahead)
            record["val_cosine_1"] = report["1"]["cosine"]
            record["val_relative_error_1"] = report["1"]["relative_error"]
            record["val_top1_1"] = report["1"]["top1_policy_on_predicted"]
        metrics.write(record)
        if (step + 1) % cfg.save_every == 0 or last:
            save_train_state(out, net, opt, step + 1, cfg, {"wall_seconds": time.time() - t0})
    metrics.close("dynamics: normalised state error and policy KL", ["dynamics_loss", "policy_kl"])
    if not report:
        report = fidelity(net, held_out, cfg.eval_steps_ahead)
    record = {"stage": "dynamics", "backbone": str(cfg.backbone_dir), "steps": cfg.steps,
              "config": asdict(cfg), "fidelity_heldout_text": report,
              "train_wall_seconds": time.time() - t0}
    save_planner(net, out / "planner", record)
    (out / "fidelity.json").write_text(json.dumps(report, indent=2) + "\n")
    return out / "planner"
