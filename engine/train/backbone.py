"""Stage 1: train the Mamba backbone as a byte-level causal LM.

AdamW with warmup + cosine decay, gradient clipping, held-out evaluation in
bits per byte, tqdm progress, metrics as JSONL. Resumable: every
``save_every`` steps the model, the optimizer moments (safetensors, no
pickle) and the step are written atomically to ``<out>/train_state``; a run
started again continues from there. The final model is a normal checkpoint
(``<out>/checkpoint``) whose manifest carries the training record.
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
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from engine.checkpoint import save_checkpoint
from engine.config import MambaConfig
from engine.models import MambaLMHeadModel
from engine.runtime import keep_freed_memory
from engine.tokenizer import ByteTokenizer
from engine.train.data import load_split


@dataclass
class BackboneConfig:
    data_dir: str = "data/pydoc"
    out_dir: str = "runs/backbone"
    model: dict = field(default_factory=lambda: {"d_model": 256, "n_layer": 4})
    seq_len: int = 256
    batch_size: int = 16
    steps: int = 2000
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 200
    eval_batches: int = 20
    save_every: int = 200
    seed: int = 0
    threads: int = 0

    @classmethod
    def from_file(cls, path: str | Path) -> "BackboneConfig":
        return cls(**json.loads(Path(path).read_text()))


def lr_at(step: int, cfg: BackboneConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def batch(data: np.ndarray, cfg: BackboneConfig, gen: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    starts = gen.integers(0, len(data) - cfg.seq_len - 1, size=cfg.batch_size)
    rows = np.stack([data[s : s + cfg.seq_len + 1] for s in starts]).astype(np.int64)
    t = torch.from_numpy(rows)
    return t[:, :-1], t[:, 1:]


@torch.no_grad()
def evaluate_bpb(model: MambaLMHeadModel, data: np.ndarray, cfg: BackboneConfig) -> float:
    """Held-out bits per byte over fixed windows (the same windows every evaluation)."""
    model.eval()
    gen = np.random.default_rng(1234)
    total, count = 0.0, 0
    for _ in range(cfg.eval_batches):
        x, y = batch(data, cfg, gen)
        logits, _ = model(x)
        total += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
        count += y.numel()
    model.train()
    return total / count / math.log(2)


def _save_state(out: Path, model: MambaLMHeadModel, opt: torch.optim.Optimizer, step: int, cfg: BackboneConfig) -> None:
    """Model + optimizer moments + step, written to a temp dir then renamed."""
    tmp = out / "train_state.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    names = {id(p): n for n, p in model.named_parameters()}
    tensors = {f"model/{k}": v.contiguous() for k, v in model.state_dict().items()
               if k != "lm_head.weight" or not model.config.tie_embeddings}
    scalars: dict[str, dict] = {}
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p)
            if not st:
                continue
            n = names[id(p)]
            tensors[f"exp_avg/{n}"] = st["exp_avg"].contiguous()
            tensors[f"exp_avg_sq/{n}"] = st["exp_avg_sq"].contiguous()
            scalars[n] = {"step": float(st["step"])}
    save_file(tensors, str(tmp / "state.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"step": step, "adam_steps": scalars, "config": asdict(cfg)}))
    final = out / "train_state"
    if final.exists():
        old = out / "train_state.old"
        final.rename(old)
        tmp.rename(final)
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    else:
        tmp.rename(final)


def _load_state(out: Path, model: MambaLMHeadModel, opt: torch.optim.Optimizer) -> int:
    state_dir = out / "train_state"
    if not (state_dir / "state.json").is_file():
        return 0
    meta = json.loads((state_dir / "state.json").read_text())
    tensors = load_file(str(state_dir / "state.safetensors"))
    model.load_state_dict({k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")},
                          strict=not model.config.tie_embeddings)
    params = dict(model.named_parameters())
    for n, scal in meta["adam_steps"].items():
        p = params[n]
        opt.state[p] = {"step": torch.tensor(scal["step"]), "exp_avg": tensors[f"exp_avg/{n}"].clone(),
                        "exp_avg_sq": tensors[f"exp_avg_sq/{n}"].clone()}
    return int(meta["step"])


def train(cfg: BackboneConfig) -> Path:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    keep_freed_memory()
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = Path(cfg.data_dir)
    train_data, val_data = load_split(data_dir, "train"), load_split(data_dir, "val")
    tok = ByteTokenizer()
    model = MambaLMHeadModel(MambaConfig(vocab_size=tok.vocab_size, **cfg.model))
    model.init_weights(seed=cfg.seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "A_log" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "A_log" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    start = _load_state(out, model, opt)
    gen = np.random.default_rng(cfg.seed + start)  # resumed runs draw fresh batches, deterministically
    metrics = open(out / "metrics.jsonl", "a")
    t0 = time.time()
    model.train()
    bpb = None
    for step in tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="backbone", mininterval=5):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        x, y = batch(train_data, cfg, gen)
        logits, _ = model(x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        record = {"step": step + 1, "loss": loss.item(), "train_bpb": loss.item() / math.log(2),
                  "lr": opt.param_groups[0]["lr"], "grad_norm": float(norm), "elapsed_s": time.time() - t0}
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            bpb = evaluate_bpb(model, val_data, cfg)
            record["val_bpb"] = bpb
        metrics.write(json.dumps(record) + "\n")
        metrics.flush()
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            _save_state(out, model, opt, step + 1, cfg)
    metrics.close()
    if bpb is None:
        bpb = evaluate_bpb(model, val_data, cfg)
    data_record = json.loads((data_dir / "data.json").read_text())
    return save_checkpoint(
        model.eval(), out / "checkpoint",
        producer={"tool": "engine.train backbone", "config": asdict(cfg)},
        record={"stage": "backbone", "data": data_record, "steps": cfg.steps,
                "tokens_seen": cfg.steps * cfg.batch_size * cfg.seq_len, "val_bits_per_byte": bpb,
                "train_wall_seconds_this_run": time.time() - t0},
    )
