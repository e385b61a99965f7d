"""``python -m engine.train STAGE --config FILE``: the training entry point.

Stages: ``data`` (prepare the text corpus), ``backbone``, ``dynamics``,
``assemble``, ``value`` and ``pipeline`` (the four in order). Every stage
reads its section of the same config file and resumes from its last saved
state when run again. Run ``backbone`` under ``torchrun --nproc_per_node N``
for DDP (gloo on CPU, nccl on CUDA).

The ``eval`` section of the same file is read by the planner-in-the-loop
evaluation, ``python -m planner.offline.evaluate --config FILE`` (``make eval``): it
runs a planner, and the engine never depends on the planner.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

STAGES = ("backbone", "dynamics", "assemble", "value", "pipeline")


def run_stage(stage: str, config: Path) -> Path:
    if stage == "backbone":
        from engine.train.backbone import BackboneConfig
        from engine.train.backbone import train as train_backbone

        return train_backbone(BackboneConfig.from_file(config))
    if stage == "dynamics":
        from engine.train.dynamics import DynamicsConfig
        from engine.train.dynamics import train as train_dynamics

        return train_dynamics(DynamicsConfig.from_file(config))
    if stage == "assemble":
        from engine.train.assemble import AssembleConfig, assemble

        return assemble(AssembleConfig.from_file(config))
    if stage == "value":
        from engine.train.value import ValueConfig
        from engine.train.value import train as train_value

        return train_value(ValueConfig.from_file(config))
    raise ValueError(f"unknown stage {stage!r}")


def pipeline(config: Path) -> Path:
    """Stages 1-4 in order; each resumes or, when already finished, finishes at once from its saved state."""
    timings = {}
    result = None
    for stage in ("backbone", "dynamics", "assemble", "value"):
        start = time.time()
        result = run_stage(stage, config)
        timings[stage] = round(time.time() - start, 1)
        print(f"{stage}: {result} ({timings[stage]} s)", flush=True)
    assert result is not None
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m engine.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="stage", required=True)
    p = sub.add_parser("data", help="prepare the training text (python3.11-doc) into train/val splits")
    p.add_argument("--out", type=Path, default=Path("data/pydoc"))
    p.add_argument("--deb", type=Path, default=None, help="an already downloaded python3.11-doc .deb")
    for stage in STAGES:
        p = sub.add_parser(stage, help=f"run the {stage} stage")
        p.add_argument("--config", type=Path, required=True, help="pipeline JSON (a section per stage)")
    args = parser.parse_args(argv)
    if args.stage == "data":
        from engine.train.data import prepare

        print(json.dumps(prepare(args.out, args.deb), indent=2))
    elif args.stage == "pipeline":
        print(f"wrote {pipeline(args.config)}")
    else:
        print(f"wrote {run_stage(args.stage, args.config)}")


if __name__ == "__main__":
    main()
