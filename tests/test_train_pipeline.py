"""The whole pipeline end to end on CPU, its result served over HTTP, and DDP under torchrun."""

import json
import os
import subprocess
import sys

import httpx
import pytest

from engine.checkpoint import load_model
from engine.models.planner_net import load_planner
from engine.train.common import read_jsonl
from tests.serving import ROOT, running_server
from tests.train_helpers import tiny_pipeline_config


def run_cli(*args, timeout=240, module="engine.train", **kw):
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, **kw)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_pipeline_then_eval_then_serve(tmp_path):
    config = tiny_pipeline_config(tmp_path)
    run_cli("pipeline", "--config", str(config))
    run = tmp_path / "run"
    ckpt = run / "checkpoint"
    loaded = load_model(ckpt)
    record = loaded.manifest["record"]
    assert record["stage"] == "value" and record["backbone"]["stage"] == "backbone"
    assert set(record["dynamics"]["fidelity_heldout_text"]["1"]) >= {"cosine", "cosine_identity", "relative_error"}
    assert "brier" in record["value"]["calibration_heldout_tasks"]
    assert loaded.manifest["producer"]["inputs"]["assembled"]["sha256"]
    planner = load_planner(ckpt, loaded.model)
    assert planner.trained and planner.record["stage"] == "value"
    for stage in ("backbone", "dynamics", "value"):
        assert (run / stage / "loss.png").is_file() and read_jsonl(run / stage / "metrics.jsonl")

    finished = {p: p.read_bytes() for p in (run / "backbone" / "checkpoint" / "manifest.json", ckpt / "manifest.json")}
    run_cli("pipeline", "--config", str(config))  # a finished pipeline started again keeps what it made
    assert all(p.read_bytes() == before for p, before in finished.items())

    run_cli("--config", str(config), module="planner.offline.evaluate")
    report = json.loads((run / "eval.json").read_text())
    tasks_report = report["heldout_tasks"]
    assert tasks_report["problems"] == 16 and 0 <= tasks_report["accuracy_off"] <= 1
    assert report["heldout_text"]["eager"]["injections"]  # the planner ran and its deltas met the text
    # With injection_rate 0 the planner runs but nothing lands: exactly the off arm.
    control = report["heldout_text"]["control_no_injection"]
    assert control["bits_per_byte_on"] == report["heldout_text"]["bits_per_byte_off"]
    assert tasks_report["control_no_injection"]["think"]["plans"] > 0

    with running_server(ckpt, "--planner-workers", "1") as url:
        body = {"model": "tiny", "prompt": "Q: 12+30=\nA: ", "max_tokens": 8, "temperature": 0}
        r = httpx.post(url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0
        r = httpx.post(url + "/v1/completions", json={**body, "think": {"deliberation_lag": 1, "plan_every": 1}},
                       timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["think"]["plans"] > 0


def test_ddp_two_processes_match_one(tmp_path):
    pytest.importorskip("torch.distributed.run")
    steps = {"steps": 6, "eval_every": 6, "save_every": 6, "task_fraction": 0.5}
    single = tiny_pipeline_config(tmp_path / "one", backbone=steps)
    double = tiny_pipeline_config(tmp_path / "two", backbone=steps)
    run_cli("backbone", "--config", str(single))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "engine.train", "backbone", "--config", str(double)], cwd=ROOT, capture_output=True,
                          text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = read_jsonl(tmp_path / "one" / "run" / "backbone" / "metrics.jsonl")
    two = read_jsonl(tmp_path / "two" / "run" / "backbone" / "metrics.jsonl")
    assert [r["step"] for r in two] == list(range(1, 7))  # rank 0 alone writes
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=1e-4)
    record = load_model(tmp_path / "two" / "run" / "backbone" / "checkpoint").manifest["record"]
    assert record["processes"] == 2
    assert record["val_bits_per_byte"] == pytest.approx(
        load_model(tmp_path / "one" / "run" / "backbone" / "checkpoint").manifest["record"]["val_bits_per_byte"],
        rel=1e-3)
