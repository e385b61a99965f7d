"""Stage 4: train the value head to predict future reward, and report how well it ranks answers.

Targets, both in the value head's range [-1, 1]:

- **text** (held-out quality ahead): the negative future loss over a
  horizon, ``1 - 2 * min(bits / max_bits, 1)`` where ``bits`` is the
  backbone's mean loss in bits over the next ``horizon`` bytes (0 bits: 1,
  ``max_bits`` = 8, a uniform guess over bytes: -1);
- **tasks** (a right answer), outcome-supervised (:mod:`engine.train.outcomes`):
  ``samples_per_problem`` answers sampled per training question, each checked
  by the task's verifier; every state on the way (after the prompt, after each
  answer byte) gets ``2 p - 1``, ``p`` the share of right answers among the
  samples that went through that state. With one sample per question every
  state of a question had the same label, so the head only learned which
  questions the model gets right; several samples give it right and wrong
  answers to the same question to tell apart.

Only the value head is trained (its input features and the dynamics stay as
stage 2 left them); it starts from a fresh initialisation drawn from the seed,
whatever value weights its input checkpoint holds. Report on held-out
problems: the within-question AUC (a right answer's final value above a wrong
answer's to the same question), best-of-k by value against majority vote and
greedy decoding, and the calibration of the value after the prompt (Brier
score beside the base rate's, reliability table).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from engine import tasks
from engine.checkpoint import MANIFEST, WEIGHTS, load_model, sha256_file
from engine.models import MambaLMHeadModel
from engine.models.planner_net import PlannerNet, load_planner
from engine.text.tokenizer import ByteTokenizer
from engine.train import outcomes
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
    problems: int = 2000  # training questions
    samples_per_problem: int = 8  # sampled answers per question (outcome supervision)
    heldout_problems: int = 500  # report: within-question AUC, best-of-k, calibration
    heldout_samples_per_problem: int = 8
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
    weight_decay: float = 0.01
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
    answers: list[list[int]] = field(default_factory=list)  # the answer bytes of each row


@torch.inference_mode()
def rollout(model: MambaLMHeadModel, net: PlannerNet, problems: list[tasks.Problem], temperature: float,
            max_new: int, seed: int, forced: list[bytes] | None = None) -> Rollouts:
    """Prefill every prompt (right-padded batch), then sample answers until a newline, in one batch.

    ``forced`` (one per problem): read these answers instead of sampling (their states and verdicts).
    """
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
    for step in range(max_new):
        f = net.features(state.ssm.float())  # (L, b, D)
        for i in torch.nonzero(active).flatten().tolist():
            feats[i].append(f[:, i].clone())
        scores = logits[:, :vocab].float()
        if temperature > 0:
            nxt = torch.multinomial(F.softmax(scores / temperature, -1), 1, generator=gen).squeeze(1)
        else:
            nxt = scores.argmax(-1)
        if forced is not None:
            nxt = torch.tensor([a[step] if step < len(a) else NEWLINE for a in forced])
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
    return Rollouts(texts, [torch.stack(f) for f in feats], verdicts, answers)


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


def reset_value_head(net: PlannerNet, seed: int) -> list[torch.nn.Parameter]:
    """Fresh value-head weights drawn from ``seed`` (as a new net has them); returns the head's parameters."""
    torch.manual_seed(seed)
    fresh = PlannerNet(net.config)
    mine = dict(net.named_parameters())
    with torch.no_grad():
        for name, p in fresh.named_parameters():
            if name.startswith("value_"):
                mine[name].copy_(p)
    return [p for n, p in net.named_parameters() if n.startswith("value_")]


@dataclass
class ValueData:
    """Training rows: task prefix states (weighted by how many samples visited them) and text states."""

    task_x: torch.Tensor  # (rows, n_layer, d_inner)
    task_y: torch.Tensor
    task_w: torch.Tensor
    text_x: torch.Tensor
    text_y: torch.Tensor


def fit(net: PlannerNet, params: list[torch.nn.Parameter], data: ValueData, cfg: ValueConfig, start: int,
        opt: torch.optim.Optimizer, metrics: Metrics | None = None, on_step=None) -> float:
    """``cfg.steps`` steps from ``start``: half of each batch from the tasks, half from text; the last loss."""
    ids = {id(p) for p in params}
    for p in net.parameters():
        p.requires_grad_(id(p) in ids)
    net.train()
    half = cfg.batch_size // 2
    loss = torch.tensor(float("nan"))
    for step in tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="value", mininterval=10,
                     disable=metrics is None):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, cfg.steps, cfg.warmup, cfg.lr, cfg.min_lr)
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + step)  # per step: resumable exactly
        tasks_pick = torch.multinomial(data.task_w, half, replacement=True, generator=gen)
        text_pick = torch.randint(len(data.text_y), (cfg.batch_size - half,), generator=gen)
        x = torch.cat([data.task_x[tasks_pick], data.text_x[text_pick]])
        target = torch.cat([data.task_y[tasks_pick], data.text_y[text_pick]])
        value, layer_values = net.values(x.transpose(0, 1))
        loss = F.mse_loss(layer_values, target[:, None].expand_as(layer_values))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if metrics is not None:
            metrics.write({"step": step + 1, "loss": loss.item(),
                           "task_mse": F.mse_loss(value[:half], target[:half]).item(),
                           "text_mse": F.mse_loss(value[half:], target[half:]).item()})
        if on_step is not None:
            on_step(step + 1)
    net.eval()
    return float(loss.detach())


def train(cfg: ValueConfig) -> Path:
    """Fit the value head; writes the final checkpoint ``<out_dir>/checkpoint`` and returns it."""
    out = cfg.begin()
    loaded = load_model(cfg.checkpoint_dir)
    model = loaded.model.float().eval()
    planner = load_planner(cfg.checkpoint_dir, model)
    net = planner.net
    final = Path(cfg.out_dir) / "checkpoint"
    trained = reset_value_head(net, cfg.seed + 31)
    opt = torch.optim.AdamW(trained, lr=cfg.lr, weight_decay=cfg.weight_decay)
    start, meta = load_train_state(out, net, opt)
    if start >= cfg.steps and (final / MANIFEST).is_file():
        return final  # finished earlier
    t0 = time.time() - meta.get("wall_seconds", 0.0)  # wall time over all runs of this stage
    train_problems = tasks.problems(cfg.problems, "train", seed=cfg.seed + 7)
    samples = outcomes.sample_answers(model, net, train_problems, cfg.samples_per_problem, cfg.temperature,
                                      cfg.max_answer_tokens, seed=cfg.seed)
    task_x, task_y, task_w, _ = outcomes.prefix_targets(samples)
    text_x, text_y = text_data(model, net, load_split(Path(cfg.data_dir), "train"), cfg, seed=cfg.seed)
    data = ValueData(task_x, task_y, task_w, text_x, text_y)
    collect_s = time.time() - t0
    metrics = Metrics(out, start)

    def checkpoint(step: int) -> None:
        if step % cfg.save_every == 0 or step == cfg.steps:
            save_train_state(out, net, opt, step, cfg, {"wall_seconds": time.time() - t0})

    fit(net, trained, data, cfg, start, opt, metrics, checkpoint)
    metrics.close("value: squared error to the reward", ["loss", "task_mse", "text_mse"])
    accuracy = float(np.mean(samples.verdicts))
    record = {"stage": "value", "config": asdict(cfg), "steps": cfg.steps,
              "train_questions": len(train_problems), "train_samples": len(samples.verdicts),
              "train_task_states": int(len(task_y)), "train_task_state_visits": int(task_w.sum()),
              "train_text_states": int(len(text_y)), "train_sampled_accuracy": accuracy,
              "collect_seconds": collect_s, "train_wall_seconds": time.time() - t0,
              **report(model, net, cfg, accuracy)}
    inputs = {"assembled": {"path": str(cfg.checkpoint_dir), "sha256": sha256_file(cfg.checkpoint_dir / WEIGHTS)}}
    dynamics_record = planner.record.get("dynamics", {})
    return write_servable(cfg.checkpoint_dir, net, final, "engine.train value",
                          {"stage": "value", "dynamics": dynamics_record, "value": record}, inputs)


@torch.no_grad()
def heldout_tasks(model: MambaLMHeadModel, net: PlannerNet, cfg: ValueConfig, base_rate: float) -> dict:
    """Within-question AUC and best-of-k on held-out questions; calibration of the value after the prompt."""
    problems = tasks.problems(cfg.heldout_problems, "heldout", seed=cfg.seed + 11)
    samples = outcomes.sample_answers(model, net, problems, cfg.heldout_samples_per_problem, cfg.temperature,
                                      cfg.max_answer_tokens, seed=cfg.seed + 99)
    greedy = rollout(model, net, problems, 0.0, cfg.max_answer_tokens, seed=0)
    final, _ = net.values(outcomes.final_features(samples).transpose(0, 1))
    ranking = outcomes.selection_report(samples, final.numpy(), greedy.verdicts)
    first = torch.stack([f[0] for f in greedy.features])  # state after the prompt, before the answer
    at_prompt, _ = net.values(first.transpose(0, 1))
    sampled_right = torch.tensor(np.array(samples.verdicts).reshape(-1, len(problems)).mean(0))
    return {"ranking_heldout_tasks": ranking,
            "calibration_heldout_tasks": calibration(at_prompt, sampled_right, base_rate)}


@torch.no_grad()
def report(model: MambaLMHeadModel, net: PlannerNet, cfg: ValueConfig, base_rate: float) -> dict:
    """Held-out problems (see :func:`heldout_tasks`) and the error on held-out text."""
    text_x, text_y = text_data(model, net, load_split(Path(cfg.data_dir), "val"), cfg, seed=cfg.seed + 5)
    text_v, _ = net.values(text_x.transpose(0, 1))
    text_report = {"states": int(len(text_y)), "mse": float(F.mse_loss(text_v, text_y)),
                   "mse_predicting_the_mean": float(((text_y - text_y.mean()) ** 2).mean()),
                   "correlation": float(torch.corrcoef(torch.stack([text_v, text_y]))[0, 1])}
    return {**heldout_tasks(model, net, cfg, base_rate), "heldout_text": text_report}
