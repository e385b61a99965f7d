"""Stage 3: backbone + planner net (dynamics, policy, value heads) into one servable checkpoint.

The planner's tensors go into the same ``model.safetensors`` under the
``planner.`` prefix (listed as extra tensors, so the engine's loader skips
them) and its config + training record into ``planner.json``; the manifest
names the inputs by path and by the sha256 of their weights, so a served
checkpoint says what produced it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from engine.checkpoint import WEIGHTS, CheckpointError, load_model, save_checkpoint, sha256_file
from engine.models.planner_net import PlannerNet
from engine.train.common import StageConfig
from engine.train.dynamics import PLANNER_WEIGHTS, load_planner_stage


@dataclass
class AssembleConfig(StageConfig):
    section = "assemble"

    out_dir: str = "runs/default"  # writes <out_dir>/assembled
    backbone: str = ""  # default <out_dir>/backbone/checkpoint
    planner: str = ""  # default <out_dir>/dynamics/planner
    seed: int = 0
    threads: int = 0

    @property
    def backbone_dir(self) -> Path:
        return Path(self.backbone) if self.backbone else Path(self.out_dir) / "backbone" / "checkpoint"

    @property
    def planner_dir(self) -> Path:
        return Path(self.planner) if self.planner else Path(self.out_dir) / "dynamics" / "planner"


def write_servable(backbone_dir: Path, net: PlannerNet, target: Path, tool: str, planner_record: dict[str, Any],
                   inputs: dict[str, Any]) -> Path:
    """The backbone at ``backbone_dir`` with ``net`` stored beside it, as a checkpoint at ``target``.

    ``backbone_dir`` may itself be an assembled checkpoint (its planner
    tensors are skipped on load); the record keeps the backbone stage's own.
    """
    loaded = load_model(backbone_dir)
    cfg = loaded.model.config
    if (net.config.n_layer, net.config.d_inner, net.config.d_state, net.config.vocab_size) != (
            cfg.n_layer, cfg.d_inner, cfg.d_state, cfg.vocab_size):
        raise CheckpointError(f"planner {net.config} does not fit the backbone at {backbone_dir}")
    backbone_record = loaded.manifest.get("record", {})
    if backbone_record.get("stage") != "backbone" and "backbone" in backbone_record:
        backbone_record = backbone_record["backbone"]
    return save_checkpoint(
        loaded.model, target,
        producer={"tool": tool, "inputs": inputs},
        record={**planner_record, "backbone": backbone_record},
        extra_tensors=net.checkpoint_tensors(),
        extra_files=net.checkpoint_files(planner_record),
    )


def assemble(cfg: AssembleConfig) -> Path:
    net, record = load_planner_stage(cfg.planner_dir)
    inputs = {"backbone": {"path": str(cfg.backbone_dir), "sha256": sha256_file(cfg.backbone_dir / WEIGHTS)},
              "planner": {"path": str(cfg.planner_dir), "sha256": sha256_file(cfg.planner_dir / PLANNER_WEIGHTS)},
              "config": asdict(cfg)}
    return write_servable(cfg.backbone_dir, net, Path(cfg.out_dir) / "assembled", "engine.train assemble",
                          {"stage": "assemble", "dynamics": record}, inputs)
