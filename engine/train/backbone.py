"""Stage 1: train the Mamba backbone as a byte-level causal LM on text and checkable tasks.

AdamW with warmup + cosine decay, gradient clipping, optional bf16 autocast,
held-out evaluation in bits per byte, tqdm progress, metrics as JSONL and a
loss-curve PNG, resumable (see :mod:`engine.train.common`).

Each batch row is a window of the text corpus, or, with probability
``task_fraction``, a window of the stream of generated training problems
(:mod:`engine.tasks`), so the model learns to answer them and the
later stages have something checkable. Under ``torchrun`` every rank draws the
same global batch (one seed) and trains on its own rows, so N processes
compute what one process does on the whole batch.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from engine import tasks
from engine.checkpoint import MANIFEST, save_checkpoint
from engine.config import MambaConfig
from engine.models import MambaLMHeadModel
from engine.text.tokenizer import ByteTokenizer
from engine.train.common import (
    Dist,
    Metrics,
    StageConfig,
    all_mean,
    cosine_lr,
    load_train_state,
    save_train_state,
    setup_distributed,
    teardown_distributed,
    wrap_ddp,
)
from engine.train.data import load_split, sample_windows


@dataclass
class BackboneConfig(StageConfig):
    section = "backbone"

    data_dir: str = "data/pydoc"
    out_dir: str = "runs/default"  # the stage writes under <out_dir>/backbone
    model: dict = field(default_factory=lambda: {"d_model": 256, "n_layer": 4})
    seq_len: int = 256
    batch_size: int = 16  # global: split over ranks under torchrun
    steps: int = 2000
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    task_fraction: float = 0.25  # share of batch rows drawn from the generated problems
    task_bytes: int = 4_000_000  # size of the generated problem stream
    bf16: bool = False  # autocast matmuls to bfloat16 (weights and optimizer stay float32)
    eval_every: int = 200
    eval_batches: int = 20
    save_every: int = 200
    stop_at: int = 0  # stop at this step with the state saved (split a run over sessions); 0: run to the end
    seed: int = 0
    threads: int = 0
    device: str = "auto"


def batch(text: np.ndarray, task_stream: np.ndarray | None, cfg: BackboneConfig,
          gen: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A global batch of (inputs, next bytes): text windows, some rows replaced by task windows."""
    t = torch.from_numpy(sample_windows(text, task_stream, cfg.batch_size, cfg.seq_len + 1, cfg.task_fraction, gen))
    return t[:, :-1], t[:, 1:]


@torch.no_grad()
def bits_per_byte(model: MambaLMHeadModel, data: np.ndarray, seq_len: int, batches: int, batch_size: int,
                  device: torch.device | None = None) -> float:
    """Held-out bits per byte over fixed windows (the same windows at every evaluation)."""
    device = device or torch.device("cpu")
    was_training = model.training
    model.eval()
    gen = np.random.default_rng(1234)
    total, count = 0.0, 0
    for _ in range(batches):
        rows = torch.from_numpy(sample_windows(data, None, batch_size, seq_len + 1, 0.0, gen))
        x, y = rows[:, :-1].to(device), rows[:, 1:].to(device)
        logits, _ = model(x)
        total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").item()
        count += y.numel()
    model.train(was_training)
    return total / count / math.log(2)


def build_model(cfg: BackboneConfig) -> MambaLMHeadModel:
    model = MambaLMHeadModel(MambaConfig(vocab_size=ByteTokenizer().vocab_size, **cfg.model))
    model.init_weights(seed=cfg.seed)
    return model


def make_optimizer(model: torch.nn.Module, cfg: BackboneConfig) -> torch.optim.AdamW:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "A_log" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "A_log" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))


def train(cfg: BackboneConfig) -> Path:
    """Train (or resume) and write ``<out_dir>/backbone/checkpoint``; returns its path."""
    d = setup_distributed(cfg.device)
    try:
        return _train(cfg, d)
    finally:
        teardown_distributed()


def _update(model: torch.nn.Module, opt: torch.optim.Optimizer, loss: torch.Tensor, grad_clip: float) -> float:
    """One optimiser step on ``loss`` with clipped gradients; returns the gradient norm before clipping."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    return float(norm)


def _train(cfg: BackboneConfig, d: Dist) -> Path:
    if cfg.batch_size % d.world:
        raise ValueError(f"batch_size {cfg.batch_size} does not split over {d.world} processes")
    out = cfg.begin()
    data_dir = Path(cfg.data_dir)
    text, val_text = load_split(data_dir, "train"), load_split(data_dir, "val")
    task_stream = (np.frombuffer(tasks.corpus(cfg.task_bytes, cfg.seed), dtype=np.uint8)
                   if cfg.task_fraction > 0 else None)
    model = build_model(cfg).to(d.device)
    opt = make_optimizer(model, cfg)
    start, meta = load_train_state(out, model, opt)
    ckpt = out / "checkpoint"
    if start >= cfg.steps and (ckpt / MANIFEST).is_file():
        return ckpt  # finished earlier: keep its checkpoint and record
    ddp = wrap_ddp(model, d)
    metrics = Metrics(out, start, enabled=d.main)
    t0 = time.time() - meta.get("wall_seconds", 0.0)  # wall time over all runs of this stage
    model.train()
    bpb = None
    rows = slice(d.rank, None, d.world)
    end = min(cfg.stop_at, cfg.steps) if cfg.stop_at else cfg.steps
    steps = range(start, end)
    for step in tqdm(steps, initial=start, total=cfg.steps, desc="backbone", mininterval=10, disable=not d.main):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, cfg.steps, cfg.warmup, cfg.lr, cfg.min_lr)
        # One generator per step: a resumed run draws exactly the batches the uninterrupted run would have.
        x, y = batch(text, task_stream, cfg, np.random.default_rng([cfg.seed, step]))
        x, y = x[rows].to(d.device), y[rows].to(d.device)
        with torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            logits, _ = ddp(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        norm = _update(model, opt, loss, cfg.grad_clip)
        mean_loss = all_mean(loss.item(), d)
        record = {"step": step + 1, "loss": mean_loss, "train_bpb": mean_loss / math.log(2),
                  "lr": opt.param_groups[0]["lr"], "grad_norm": norm, "elapsed_s": time.time() - t0}
        if d.main and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
            bpb = bits_per_byte(model, val_text, cfg.seq_len, cfg.eval_batches, cfg.batch_size, d.device)
            record["val_bpb"] = bpb
        metrics.write(record)
        if d.main and ((step + 1) % cfg.save_every == 0 or step + 1 == end):
            save_train_state(out, model, opt, step + 1, cfg, {"wall_seconds": time.time() - t0})
    metrics.close("backbone: loss and held-out bits per byte", ["train_bpb", "val_bpb"])
    if end < cfg.steps:
        return out / "train_state"
    if d.main:
        if bpb is None:
            bpb = bits_per_byte(model, val_text, cfg.seq_len, cfg.eval_batches, cfg.batch_size, d.device)
        data_json = data_dir / "data.json"
        data_record = json.loads(data_json.read_text()) if data_json.is_file() else {}
        save_checkpoint(
            model.cpu().eval(), ckpt,
            producer={"tool": "engine.train backbone", "config": asdict(cfg)},
            record={"stage": "backbone", "data": data_record, "tasks": {"kinds": list(tasks.KINDS),
                    "task_fraction": cfg.task_fraction}, "steps": cfg.steps, "processes": d.world,
                    "bytes_seen": cfg.steps * cfg.batch_size * cfg.seq_len, "val_bits_per_byte": bpb,
                    "parameters": sum(p.numel() for p in model.parameters()),
                    "train_wall_seconds": time.time() - t0},
        )
    return ckpt
