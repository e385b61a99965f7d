"""Dynamics and value stages: they record the engine's real states, fit them, and report against baselines."""

import numpy as np
import pytest
import torch

from engine.models.planner_net import PlannerNet
from engine.train import tasks
from engine.train.dynamics import Trajectory, collect, fidelity, layer_error, losses
from engine.train.value import ValueConfig, calibration, rollout
from tests.conftest import make_model


def test_collection_records_the_states_the_engine_produces(tiny_model):
    ids = torch.randint(0, 256, (3, 14), generator=torch.Generator().manual_seed(0))
    traj = collect(tiny_model, ids, prefix=6)
    assert traj.ssm.shape[0] == 9 and traj.tokens.shape == (8, 3) and traj.logits.shape[:2] == (9, 3)
    with torch.inference_mode():
        state = tiny_model.allocate_state(3)
        logits = None
        for t in range(ids.shape[1]):  # the serving decode step, token by token from an empty state
            if t >= 6:
                torch.testing.assert_close(traj.ssm[t - 6], state.ssm, atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(traj.logits[t - 6], logits[:, :tiny_model.config.vocab_size],
                                           atol=1e-4, rtol=1e-4)
            logits = tiny_model.step(ids[:, t], state)
        torch.testing.assert_close(traj.ssm[-1], state.ssm, atol=1e-5, rtol=1e-4)
    assert torch.equal(traj.tokens, ids[:, 6:].t())


def test_dynamics_training_beats_the_identity_baseline_on_its_states():
    torch.manual_seed(0)
    model = make_model(seed=2, vocab_size=261)
    net = PlannerNet.for_backbone(model)
    ids = torch.randint(0, 40, (8, 40), generator=torch.Generator().manual_seed(1))
    raw = collect(model, ids, prefix=8)
    traj = Trajectory(raw.ssm.clone(), raw.tokens.clone(), raw.logits.clone())
    opt = torch.optim.Adam([p for n, p in net.named_parameters() if not n.startswith("value_")], lr=1e-2)
    gen = np.random.default_rng(0)
    first = None
    for _ in range(150):
        t = torch.from_numpy(gen.integers(0, 30, size=64))
        b = torch.from_numpy(gen.integers(0, 8, size=64))
        parts = losses(net, traj, (t, b), unroll=2)
        first = first or {k: v.item() for k, v in parts.items()}
        opt.zero_grad()
        (parts["dynamics"] + parts["policy"]).backward()
        opt.step()
    assert parts["dynamics"].item() < 0.5 * first["dynamics"] and parts["policy"].item() < first["policy"]
    report = fidelity(net, traj, steps_ahead=2)
    assert set(report) == {"1", "2"}
    one = report["1"]
    assert one["relative_error_identity"] == 1.0 and one["relative_error"] < 1.0
    assert one["cosine"] > one["cosine_identity"]
    assert 0 <= one["top1_policy_on_predicted"] <= 1


def test_layer_error_is_one_for_predicting_no_change():
    prev, true = torch.randn(2, 4, 3, 5), torch.randn(2, 4, 3, 5)
    torch.testing.assert_close(layer_error(prev, true, prev), torch.ones(2))
    assert float(layer_error(true, true, prev).max()) == 0.0


def test_rollout_verdicts_are_the_verifiers_and_states_cover_each_answer(tiny_model):
    net = PlannerNet.for_backbone(tiny_model)
    problems = tasks.problems(6, "train", seed=0)
    r = rollout(tiny_model, net, problems, temperature=0.0, max_new=5, seed=0)
    assert r.verdicts == [tasks.verify(p.question, c) for p, c in zip(problems, r.completions)]
    for f, c in zip(r.features, r.completions):
        # One decision point before each answer byte, and one where the newline (or the limit) was chosen.
        assert f.shape[1:] == (tiny_model.config.n_layer, tiny_model.config.d_inner)
        assert f.shape[0] == min(len(c.encode()) + 1, 5)
    again = rollout(tiny_model, net, problems, temperature=0.0, max_new=5, seed=1)
    assert again.completions == r.completions  # greedy does not depend on the seed


def test_calibration_scores_perfect_and_base_rate_predictions():
    verdicts = torch.tensor([True, False, True, True])
    perfect = calibration(torch.tensor([1.0, -1.0, 1.0, 1.0]), verdicts, base_rate=0.75)
    assert perfect["brier"] == 0.0 and perfect["brier_base_rate"] == pytest.approx(0.1875)
    flat = calibration(torch.full((4,), 0.5), verdicts, base_rate=0.75)
    assert flat["brier"] == pytest.approx(flat["brier_base_rate"])
    assert sum(row["count"] for row in flat["reliability"]) == 4


def test_value_config_defaults_point_at_the_assembled_checkpoint(tmp_path):
    cfg = ValueConfig(out_dir=str(tmp_path))
    assert cfg.checkpoint_dir == tmp_path / "assembled"
