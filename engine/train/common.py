"""What every training stage shares: config sections, distributed set-up, resumable state, metrics.

- **Configs**: one JSON file drives the whole pipeline, a section per stage
  (``{"backbone": {...}, "dynamics": {...}, ...}``); a stage run alone reads
  its own section from the same file (or a flat file of its fields).
- **Distributed**: under ``torchrun`` (``WORLD_SIZE`` > 1) a stage joins a
  process group (gloo on CPU, nccl on CUDA) and wraps its model in DDP; a
  single process is the default and needs nothing.
- **Resume**: every ``save_every`` steps the trained parameters, the AdamW
  moments and the step go to ``<out>/train_state`` (safetensors + JSON, no
  pickle), written in a temporary directory and renamed, so a crash leaves the
  previous state whole. A stage started again continues from there.
- **Metrics**: one JSON object per step in ``metrics.jsonl`` and a PNG of the
  loss curves next to it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from engine.runtime import keep_freed_memory

C = TypeVar("C")
S = TypeVar("S", bound="StageConfig")
STAGES = ("backbone", "dynamics", "assemble", "value", "eval")  # sections of a pipeline config (eval: planner.offline.evaluate)
INHERITED = ("out_dir", "seed", "threads", "data_dir")  # top-level keys of a pipeline config every stage shares


def cosine_lr(step: int, steps: int, warmup: int, lr: float, min_lr: float) -> float:
    """Linear warmup to ``lr``, then cosine decay to ``min_lr`` at ``steps``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def load_section(cls: type[C], path: str | Path, section: str, **overrides: Any) -> C:
    """The dataclass ``cls`` from ``section`` of a pipeline config (or from a flat file of its fields).

    Top-level ``out_dir`` and ``seed`` of a pipeline config are inherited by
    every section that does not set its own. Unknown keys are an error, so a
    typo never silently falls back to a default.
    """
    raw = json.loads(Path(path).read_text())
    pipeline = any(isinstance(raw.get(stage), dict) for stage in STAGES)
    body = dict(raw.get(section, {})) if pipeline else dict(raw)
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    for key in INHERITED:
        if pipeline and key in raw and key not in body and key in known:
            body[key] = raw[key]
    body.update(overrides)
    unknown = sorted(set(body) - known)
    if unknown:
        raise ValueError(f"{path}: unknown {section} settings {unknown} (known: {sorted(known)})")
    return cls(**body)


class StageConfig:
    """Base of the stages' config dataclasses: ``from_file`` reads the stage's ``section``."""

    section: ClassVar[str]

    @classmethod
    def from_file(cls: type[S], path: str | Path, **overrides: Any) -> S:
        return load_section(cls, path, cls.section, **overrides)

    @property
    def stage_dir(self) -> Path:
        """Where the stage keeps its state, metrics and output: ``<out_dir>/<section>``."""
        return Path(self.out_dir) / self.section  # type: ignore[attr-defined]

    def begin(self) -> Path:
        """What every stage does first: threads, allocator, seed; returns the (created) stage folder."""
        if self.threads:  # type: ignore[attr-defined]
            torch.set_num_threads(self.threads)  # type: ignore[attr-defined]
        keep_freed_memory()
        torch.manual_seed(self.seed)  # type: ignore[attr-defined]
        self.stage_dir.mkdir(parents=True, exist_ok=True)
        return self.stage_dir


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto") -> Dist:
    """Join the torchrun process group when there is one; pick the device."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(f"cuda:{local}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Dist(rank, world, dev)


def teardown_distributed() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def wrap_ddp(model: nn.Module, d: Dist) -> nn.Module:
    if d.world == 1:
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)


def all_mean(value: float, d: Dist) -> float:
    """The mean of a scalar over ranks (each rank's loss is over its own shard of the batch)."""
    if d.world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / d.world


def save_train_state(out: Path, module: nn.Module, opt: torch.optim.Optimizer, step: int,
                     config: Any, extra: Mapping[str, Any] | None = None) -> None:
    """Trainable parameters + AdamW moments + step, atomically (temp dir, then rename)."""
    tmp = out / "train_state.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    names = {id(p): n for n, p in module.named_parameters()}
    tensors = {f"param/{n}": p.detach().contiguous().cpu() for n, p in module.named_parameters()}
    adam_steps: dict[str, float] = {}
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p)
            if not st:
                continue
            n = names[id(p)]
            tensors[f"exp_avg/{n}"] = st["exp_avg"].contiguous().cpu()
            tensors[f"exp_avg_sq/{n}"] = st["exp_avg_sq"].contiguous().cpu()
            adam_steps[n] = float(st["step"])
    save_file(tensors, str(tmp / "state.safetensors"))
    body = {"step": step, "adam_steps": adam_steps, "config": asdict(config), **(extra or {})}
    (tmp / "state.json").write_text(json.dumps(body))
    final, old = out / "train_state", out / "train_state.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def load_train_state(out: Path, module: nn.Module, opt: torch.optim.Optimizer) -> tuple[int, dict[str, Any]]:
    """Restore what :func:`save_train_state` wrote; (0, {}) when there is nothing to resume."""
    state_dir = out / "train_state"
    if not (state_dir / "state.json").is_file():
        return 0, {}
    meta = json.loads((state_dir / "state.json").read_text())
    tensors = load_file(str(state_dir / "state.safetensors"))
    params = dict(module.named_parameters())
    saved = {k[len("param/"):] for k in tensors if k.startswith("param/")}
    if saved != set(params):
        raise ValueError(f"{state_dir} holds other parameters than this model "
                         f"(missing {sorted(set(params) - saved)[:3]}, extra {sorted(saved - set(params))[:3]}): "
                         "its config changed; delete the folder to start over")
    with torch.no_grad():
        for n, p in params.items():
            if tensors[f"param/{n}"].shape != p.shape:
                raise ValueError(f"{state_dir}: {n} is {tuple(tensors[f'param/{n}'].shape)} there, "
                                 f"{tuple(p.shape)} here: its config changed; delete the folder to start over")
            p.copy_(tensors[f"param/{n}"])
    for n, adam_step in meta["adam_steps"].items():
        p = params[n]
        opt.state[p] = {"step": torch.tensor(adam_step), "exp_avg": tensors[f"exp_avg/{n}"].to(p.device).clone(),
                        "exp_avg_sq": tensors[f"exp_avg_sq/{n}"].to(p.device).clone()}
    return int(meta["step"]), meta


class Metrics:
    """``metrics.jsonl`` (appended, so a resumed run continues the file) and its loss-curve PNG."""

    def __init__(self, out: Path, resumed_at: int = 0, enabled: bool = True):
        self.path = out / "metrics.jsonl"
        self.enabled = enabled
        if enabled and self.path.exists():  # drop steps a killed run logged after its last saved state
            kept = [r for r in read_jsonl(self.path) if r.get("step", 0) <= resumed_at]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._fh = open(self.path, "a") if enabled else None

    def write(self, record: Mapping[str, Any]) -> None:
        if self._fh is not None:
            self._fh.write(json.dumps(dict(record)) + "\n")
            self._fh.flush()

    def close(self, title: str, curves: Iterable[str]) -> Path | None:
        if self._fh is None:
            return None
        self._fh.close()
        return plot_curves(self.path, self.path.with_name("loss.png"), title, list(curves))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(metrics: Path, png: Path, title: str, curves: list[str]) -> Path | None:
    """Plot ``curves`` (metric names) against step; None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = read_jsonl(metrics)
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in curves:
        pts = [(r["step"], r[name]) for r in rows if name in r]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, label=name, marker="o" if len(pts) < 30 else None, markersize=3)
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
