"""Tiny training data and configs shared by the training tests."""

from __future__ import annotations

import json
from pathlib import Path

TEXT = ("the quick brown fox jumps over the lazy dog. a stitch in time saves nine. " * 300).encode()


def tiny_data(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.bin").write_bytes(TEXT)
    (folder / "val.bin").write_bytes(TEXT[:6000])
    (folder / "data.json").write_text(json.dumps({"source": "test"}))
    return folder


def tiny_pipeline_config(tmp_path: Path, **sections) -> Path:
    """A whole pipeline small enough for a test (seconds per stage)."""
    data = tiny_data(tmp_path / "data")
    config = {
        "out_dir": str(tmp_path / "run"), "data_dir": str(data), "seed": 0, "threads": 1,
        "backbone": {"model": {"d_model": 32, "n_layer": 2}, "seq_len": 32, "batch_size": 8, "steps": 30,
                     "lr": 1e-2, "min_lr": 1e-3, "warmup": 2, "eval_every": 10, "eval_batches": 2, "save_every": 10,
                     "task_bytes": 20000},
        "dynamics": {"steps": 30, "windows": 4, "prefix": 16, "horizon": 12, "pairs": 32, "eval_windows": 4,
                     "eval_every": 15, "save_every": 15, "task_bytes": 20000},
        "assemble": {},
        "value": {"problems": 48, "heldout_problems": 24, "text_windows": 4, "prefix": 16, "horizon": 8,
                  "steps": 20, "batch_size": 32, "save_every": 10},
        "eval": {"problems": 16, "max_answer_tokens": 6, "text_windows": 3, "text_prefix": 16, "text_bytes": 24,
                 "bootstrap": 100, "simulator": "backbone",
                 "arms": {"eager": {"deliberation_lag": 1, "plan_every": 1, "simulations": 8},
                          "control_no_injection": {"injection_rate": 0.0, "simulations": 8}},
                 "text_arms": ["eager", "control_no_injection"]},
    }
    for name, body in sections.items():
        config[name].update(body)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return path
