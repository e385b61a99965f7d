"""Stage 4: train the value head to predict future reward, and report its calibration.

Targets, both in the value head's range [-1, 1]:

- **text** (held-out quality ahead): the negative future loss over a
  horizon, ``1 - 2 * min(bits / max_bits, 1)`` where ``bits`` is the
  backbone's mean loss in bits over the next ``horizon`` bytes (0 bits: 1,
  ``max_bits`` = 8, a uniform guess over bytes: -1);
- **tasks** (a right answer): the verifier's verdict, +1 or -1, on an answer
  the backbone completes by sampling from the training problems' prompts.
  Every state on the way (after the prompt, after each answer byte) gets the
  verdict of its completion, so the head learns the chance of ending right
  from there: a Monte Carlo return, ``2 p - 1`` in expectation.

Only the value head is trained (its input features and the dynamics stay
as stage 2 left them). Calibration on held-out problems: the value after the
prompt read as a probability ``p = (v + 1) / 2`` of a right sampled answer,
its Brier score beside the base rate's (always predicting the training
accuracy), and a reliability table.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from engine.checkpoint import MANIFEST, WEIGHTS, load_model, sha256_file
from engine.models import MambaLMHeadModel
from engine.models.planner_net import PlannerNet, load_planner
from engine.tokenizer import ByteTokenizer
from engine.train import tasks
from engine.train.assemble import write_servable
from engine.train.common import Metrics, StageConfig, cosine_lr, load_train_state, save_train_state
from engine.train.data import load_split, sample_windows
from engine.train.dynamics import collect

NEWLINE = ord("\n")


@dataclass
class ValueConfig(StageConfig):
    section = "value"

    out_dir: str = "runs/default"  # reads <out_dir>/assembled, writes <out_dir>/checkpoint
    data_dir: str = "data/pydoc"
    checkpoint: str = ""  # the assembled checkpoint; default <out_dir>/assembled
    problems: int = 2000  # training problems, one sampled completion each
    heldout_problems: int = 500  # calibration
    temperature: float = 0.7  # sampling temperature of the completions
    max_answer_tokens: int = 16
    text_windows: int = 64
    prefix: int = 64
    horizon: int = 16  # bytes of future loss in a text target
    max_bits: float = 8.0
    steps: int = 300
    batch_size: int = 256
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup: int = 10
    save_every: int = 100
    seed: int = 0
    threads: int = 0

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint) if self.checkpoint else Path(self.out_dir) / "assembled"


@dataclass
class Rollouts:
    completions: list[str]  # the answer text of each row (up to the newline)
    features: list[torch.Tensor]  # per row: (k, n_layer, d_inner) at the k decision points
    verdicts: list[bool]


@torch.inference_mode()
def rollout(model: MambaLMHeadModel, net: PlannerNet, problems: list[tasks.Problem], temperature: float,
            max_new: int, seed: int) -> Rollouts:
    """Prefill every prompt (right-padded batch), then sample answers until a newline, in one batch."""
    tok = ByteTokenizer()
    prompts = [tok.encode(p.prompt) for p in problems]
    lengths = torch.tensor([len(p) for p in prompts])
    ids = torch.zeros(len(prompts), int(lengths.max()), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p)
    logits, state = model.prefill(ids, lengths=lengths)
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    answers: list[list[int]] = [[] for _ in problems]
    feats: list[list[torch.Tensor]] = [[] for _ in problems]
    active = torch.ones(len(problems), dtype=torch.bool)
    for _ in range(max_new):
        f = net.features(state.ssm.float())  # (L, b, D)
        for i in torch.nonzero(active).flatten().tolist():
            feats[i].append(f[:, i].clone())
        scores = logits[:, :vocab].float()
        if temperature > 0:
            nxt = torch.multinomial(F.softmax(scores / temperature, -1), 1, generator=gen).squeeze(1)
        else:
            nxt = scores.argmax(-1)
        for i in torch.nonzero(active).flatten().tolist():
            t = int(nxt[i])
            if t == NEWLINE or t >= 256:
                active[i] = False
            else:
                answers[i].append(t)
        if not active.any():
            break
        logits = model.step(nxt, state)
    texts = [bytes(a).decode("utf-8", errors="replace") for a in answers]
    verdicts = [tasks.verify(p.question, t) for p, t in zip(problems, texts)]
    return Rollouts(texts, [torch.stack(f) for f in feats], verdicts)


def verdict_data(model: MambaLMHeadModel, net: PlannerNet, problems: list[tasks.Problem], cfg: ValueConfig,
                 seed: int, chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor, Rollouts]:
    """Features of every decision point and its completion's verdict (+1 / -1)."""
    feats, targets = [], []
    done = Rollouts([], [], [])
    for start in range(0, len(problems), chunk):
        r = rollout(model, net, problems[start : start + chunk], cfg.temperature, cfg.max_answer_tokens, seed + start)
        for f, ok in zip(r.features, r.verdicts):
            feats.append(f)
            targets.append(torch.full((f.shape[0],), 1.0 if ok else -1.0))
        done.completions += r.completions
        done.features += r.features
        done.verdicts += r.verdicts
    return torch.cat(feats), torch.cat(targets), done


@torch.inference_mode()
def text_data(model: MambaLMHeadModel, net: PlannerNet, data: np.ndarray, cfg: ValueConfig,
              seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Features along text windows and ``1 - 2 min(future bits / max_bits, 1)`` over the next ``horizon`` bytes."""
    ids = torch.from_numpy(sample_windows(data, None, cfg.text_windows, cfg.prefix + 2 * cfg.horizon, 0.0,
                                         np.random.default_rng(seed)))
    traj = collect(model, ids, cfg.prefix)
    T = traj.tokens.shape[0]
    nll = F.cross_entropy(traj.logits[:T].flatten(0, 1), traj.tokens.flatten(), reduction="none").view(T, -1)
    bits = nll / math.log(2)
    starts = T - cfg.horizon + 1
    future = torch.stack([bits[t : t + cfg.horizon].mean(0) for t in range(starts)])  # (starts, b)
    target = 1 - 2 * (future / cfg.max_bits).clamp(max=1.0)
    f = net.features(traj.ssm[:starts].transpose(0, 1).flatten(1, 2))  # (L, starts * b, D), t-major
    return f.transpose(0, 1), target.flatten()


def calibration(values: torch.Tensor, verdicts: torch.Tensor, base_rate: float, bins: int = 5) -> dict:
    """Brier score of p = (v + 1) / 2 against right/wrong, beside the base rate's; a reliability table."""
    p = ((values + 1) / 2).clamp(0, 1)
    y = verdicts.float()
    table = []
    for lo in np.linspace(0, 1, bins, endpoint=False):
        hi = lo + 1 / bins
        sel = (p >= lo) & ((p < hi) if hi < 1 else (p <= hi))
        if sel.any():
            table.append({"p_from": round(float(lo), 2), "p_to": round(float(hi), 2), "count": int(sel.sum()),
                          "mean_p": float(p[sel].mean()), "accuracy": float(y[sel].mean())})
    return {"problems": int(len(y)), "accuracy": float(y.mean()), "brier": float(((p - y) ** 2).mean()),
            "brier_base_rate": float(((base_rate - y) ** 2).mean()), "base_rate": base_rate,
            "reliability": table}


def train(cfg: ValueConfig) -> Path:
    """Fit the value head; writes the final checkpoint ``<out_dir>/checkpoint`` and returns it."""
    out = cfg.begin()
    loaded = load_model(cfg.checkpoint_dir)
    model = loaded.model.float().eval()
    planner = load_planner(cfg.checkpoint_dir, model)
    net = planner.net
    final = Path(cfg.out_dir) / "checkpoint"
    trained = [p for n, p in net.named_parameters() if n.startswith("value_")]
    opt = torch.optim.AdamW(trained, lr=cfg.lr, weight_decay=0.0)
    start, meta = load_train_state(out, net, opt)
    if start >= cfg.steps and (final / MANIFEST).is_file():
        return final  # finished earlier
    t0 = time.time() - meta.get("wall_seconds", 0.0)  # wall time over all runs of this stage
    train_problems = tasks.problems(cfg.problems, "train", seed=cfg.seed + 7)
    task_x, task_y, train_rollouts = verdict_data(model, net, train_problems, cfg, seed=cfg.seed)
    text_x, text_y = text_data(model, net, load_split(Path(cfg.data_dir), "train"), cfg, seed=cfg.seed)
    x, y = torch.cat([task_x, text_x]), torch.cat([task_y, text_y])
    is_task = torch.cat([torch.ones(len(task_y), dtype=torch.bool), torch.zeros(len(text_y), dtype=torch.bool)])
    collect_s = time.time() - t0
    trained_ids = {id(p) for p in trained}
    for p in net.parameters():
        p.requires_grad_(id(p) in trained_ids)
    metrics = Metrics(out, start)
    net.train()
    for step in tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="value", mininterval=10):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, cfg.steps, cfg.warmup, cfg.lr, cfg.min_lr)
        # Half of each batch from the tasks, half from text, whatever the sizes of the two sets.
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + step)  # per step: resumable exactly
        half = cfg.batch_size // 2
        pick = torch.cat([torch.nonzero(is_task).flatten()[torch.randint(int(is_task.sum()), (half,), generator=gen)],
                          torch.nonzero(~is_task).flatten()[torch.randint(int((~is_task).sum()), (half,),
                                                                          generator=gen)]])
        value, layer_values = net.values(x[pick].transpose(0, 1))
        target = y[pick]
        loss = F.mse_loss(layer_values, target[:, None].expand_as(layer_values))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        metrics.write({"step": step + 1, "loss": loss.item(),
                       "task_mse": F.mse_loss(value[:half], target[:half]).item(),
                       "text_mse": F.mse_loss(value[half:], target[half:]).item(), "elapsed_s": time.time() - t0})
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            save_train_state(out, net, opt, step + 1, cfg, {"wall_seconds": time.time() - t0})
    metrics.close("value: squared error to the reward", ["loss", "task_mse", "text_mse"])
    net.eval()
    record = {"stage": "value", "config": asdict(cfg), "steps": cfg.steps,
              "train_task_states": int(len(task_y)), "train_text_states": int(len(text_y)),
              "train_sampled_accuracy": float(np.mean(train_rollouts.verdicts)),
              "collect_seconds": collect_s, "train_wall_seconds": time.time() - t0,
              **report(model, net, cfg, float(np.mean(train_rollouts.verdicts)))}
    inputs = {"assembled": {"path": str(cfg.checkpoint_dir), "sha256": sha256_file(cfg.checkpoint_dir / WEIGHTS)}}
    dynamics_record = planner.record.get("dynamics", {})
    return write_servable(cfg.checkpoint_dir, net, final, "engine.train value",
                          {"stage": "value", "dynamics": dynamics_record, "value": record}, inputs)


@torch.no_grad()
def report(model: MambaLMHeadModel, net: PlannerNet, cfg: ValueConfig, base_rate: float) -> dict:
    """Calibration on held-out problems (value after the prompt) and error on held-out text."""
    problems = tasks.problems(cfg.heldout_problems, "heldout", seed=cfg.seed + 11)
    _, _, r = verdict_data(model, net, problems, cfg, seed=cfg.seed + 99)
    first = torch.stack([f[0] for f in r.features])  # state after the prompt, before the answer
    values, _ = net.values(first.transpose(0, 1))
    tasks_report = calibration(values, torch.tensor(r.verdicts), base_rate)
    text_x, text_y = text_data(model, net, load_split(Path(cfg.data_dir), "val"), cfg, seed=cfg.seed + 5)
    text_v, _ = net.values(text_x.transpose(0, 1))
    text_report = {"states": int(len(text_y)), "mse": float(F.mse_loss(text_v, text_y)),
                   "mse_predicting_the_mean": float(((text_y - text_y.mean()) ** 2).mean()),
                   "correlation": float(torch.corrcoef(torch.stack([text_v, text_y]))[0, 1])}
    return {"calibration_heldout_tasks": tasks_report, "heldout_text": text_report}
