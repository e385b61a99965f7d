"""Backbone stage and shared training machinery: the loss falls, a run resumes where it stopped, configs are strict."""

import json

import numpy as np
import pytest
import torch

from engine.checkpoint import load_model
from engine.train.backbone import BackboneConfig, build_model, make_optimizer, train
from engine.train.common import Metrics, load_section, load_train_state, read_jsonl
from engine.train.data import held_out
from tests.train_helpers import tiny_pipeline_config


def config(tmp_path, steps, **kw):
    return BackboneConfig.from_file(tiny_pipeline_config(tmp_path), steps=steps, **kw)


def read_metrics(cfg):
    return read_jsonl(cfg.stage_dir / "metrics.jsonl")


def test_loss_falls_and_checkpoint_serves(tmp_path):
    cfg = config(tmp_path, steps=30)
    ckpt = train(cfg)
    rows = read_metrics(cfg)
    assert np.mean([r["loss"] for r in rows[-5:]]) < np.mean([r["loss"] for r in rows[:5]]) - 0.5
    assert [r["step"] for r in rows if "val_bpb" in r] == [10, 20, 30]
    assert (cfg.stage_dir / "loss.png").stat().st_size > 1000
    loaded = load_model(ckpt)
    record = loaded.manifest["record"]
    assert record["stage"] == "backbone" and record["val_bits_per_byte"] > 0 and record["tasks"]["task_fraction"] > 0
    with torch.inference_mode():
        logits, state = loaded.model.prefill(torch.tensor([loaded.tokenizer.encode("the quick")]))
        assert loaded.model.step(logits.argmax(-1), state).shape == (1, loaded.tokenizer.vocab_size)


def test_resume_continues_from_the_saved_step_and_optimizer_state(tmp_path):
    cfg = config(tmp_path / "a", steps=15, stop_at=10)
    assert train(cfg) == cfg.stage_dir / "train_state"  # stopped at 10: no checkpoint yet
    assert [r["step"] for r in read_metrics(cfg)] == list(range(1, 11))
    model = build_model(cfg)
    opt = make_optimizer(model, cfg)
    assert load_train_state(cfg.stage_dir, model, opt)[0] == 10
    assert all(float(s["step"]) == 10 for s in opt.state.values()) and len(opt.state) == len(list(model.parameters()))
    assert train(config(tmp_path / "a", steps=15)) == cfg.stage_dir / "checkpoint"  # resumed at 10
    assert [r["step"] for r in read_metrics(cfg)] == list(range(1, 16))

    straight = config(tmp_path / "b", steps=15)  # the same 15 steps without a stop
    train(straight)
    resumed = load_model(cfg.stage_dir / "checkpoint").model
    uninterrupted = load_model(straight.stage_dir / "checkpoint").model
    for (name, p), q in zip(resumed.named_parameters(), uninterrupted.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)
    losses = [[r["loss"] for r in read_metrics(c)] for c in (cfg, straight)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_a_killed_run_loses_only_steps_after_its_last_saved_state(tmp_path):
    cfg = config(tmp_path, steps=10)
    train(cfg)
    with open(cfg.stage_dir / "metrics.jsonl", "a") as fh:  # steps logged after the save, then the process died
        for step in (11, 12):
            fh.write(json.dumps({"step": step, "loss": 9.0}) + "\n")
    train(config(tmp_path, steps=12))
    rows = read_metrics(cfg)
    assert [r["step"] for r in rows] == list(range(1, 13)) and all(r["loss"] != 9.0 for r in rows)


def test_resume_refuses_a_state_from_another_model(tmp_path):
    cfg = config(tmp_path, steps=10)
    train(cfg)
    other = config(tmp_path, steps=12, model={"d_model": 48, "n_layer": 2})
    with pytest.raises(ValueError, match="config changed"):
        train(other)


def test_bf16_autocast_trains(tmp_path):
    cfg = config(tmp_path, steps=6, bf16=True, eval_every=3)
    train(cfg)
    rows = read_metrics(cfg)
    assert len(rows) == 6 and all(np.isfinite(r["loss"]) for r in rows)


def test_config_sections_are_strict_and_share_top_level_keys(tmp_path):
    path = tiny_pipeline_config(tmp_path)
    cfg = BackboneConfig.from_file(path)
    assert cfg.out_dir == str(tmp_path / "run") and cfg.threads == 1 and cfg.data_dir.endswith("data")
    body = json.loads(path.read_text())
    body["backbone"]["stepz"] = 3
    path.write_text(json.dumps(body))
    with pytest.raises(ValueError, match="stepz"):
        BackboneConfig.from_file(path)
    flat = tmp_path / "flat.json"
    flat.write_text(json.dumps({"steps": 7}))
    assert load_section(BackboneConfig, flat, "backbone").steps == 7


def test_metrics_file_and_plot(tmp_path):
    m = Metrics(tmp_path)
    for step in range(1, 4):
        m.write({"step": step, "loss": 1.0 / step})
    assert m.close("t", ["loss"]).stat().st_size > 1000
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3]


def test_held_out_split_is_deterministic():
    names = [f"library/mod{i}.rst.txt" for i in range(500)]
    assert [held_out(n) for n in names] == [held_out(n) for n in names]
    assert 0 < sum(held_out(n) for n in names) < 30
