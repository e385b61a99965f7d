"""Dynamics and value stages: they record the engine's real states, fit them, and report against baselines."""

import numpy as np
import pytest
import torch

from engine import tasks
from engine.models.planner_net import PlannerNet
from engine.train.dynamics import Trajectory, collect, fidelity, layer_error, losses
from engine.train.outcomes import Samples, final_features, prefix_targets, within_question_auc
from engine.train.value import ValueConfig, ValueData, calibration, fit, reset_value_head, rollout, text_data
from tests.conftest import make_model
from tests.train_helpers import TEXT


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


def _right_and_wrong_answers(model, net, problems):
    """Each question answered four ways (its right answer and three wrong ones), read through ``model``."""
    answers = []
    for p in problems:
        right = p.answer.encode()
        answers += [right, right + b"1", b"x" + right[1:], b"0" + right]
    rows = [p for p in problems for _ in range(4)]
    r = rollout(model, net, rows, temperature=0.0, max_new=12, seed=0, forced=answers)
    return Samples(problems, [q for q in range(len(problems)) for _ in range(4)], r.completions, r.answers,
                   r.features, r.verdicts)


def _fit_and_rank(model, samples, verdicts):
    """The value head fitted to ``verdicts`` (outcome-supervised); its within-question AUC against the truth."""
    torch.manual_seed(0)
    net = PlannerNet.for_backbone(model)
    fitted = Samples(samples.problems, samples.question, samples.completions, samples.tokens, samples.features,
                     verdicts)
    x, y, w, _ = prefix_targets(fitted)
    cfg = ValueConfig(steps=300, batch_size=64, lr=1e-2, min_lr=1e-3, warmup=5, text_windows=4, prefix=16, horizon=8)
    text_x, text_y = text_data(model, net, np.frombuffer(TEXT, dtype=np.uint8), cfg, seed=0)
    params = reset_value_head(net, seed=1)
    fit(net, params, ValueData(x, y, w, text_x, text_y), cfg, 0, torch.optim.AdamW(params, lr=cfg.lr))
    with torch.no_grad():
        values, _ = net.values(final_features(samples).transpose(0, 1))
    return within_question_auc(values.numpy(), np.array(samples.verdicts), np.array(samples.question))


def test_outcome_supervised_value_tells_right_from_wrong_answers_only_with_true_labels(tiny_model):
    net = PlannerNet.for_backbone(tiny_model)
    samples = _right_and_wrong_answers(tiny_model, net, tasks.problems(40, "train", seed=3))
    assert sum(samples.verdicts) == 40  # the verifier marks exactly the right answer of each question
    x, y, w, q = prefix_targets(samples)
    prompt_rows = w == 4  # the state after the prompt: visited by all four answers, one of them right
    assert torch.allclose(y[prompt_rows], torch.full_like(y[prompt_rows], 2 * 0.25 - 1))
    auc, pairs = _fit_and_rank(tiny_model, samples, samples.verdicts)
    assert pairs == 40 * 3 and auc > 0.85  # 0.925 when written
    # The same answers with each question's verdicts shuffled among its own answers: nothing to learn. Chance
    # over 120 pairs varies by about 0.05, so the bound is on the mean over three shuffles (0.59 when written).
    shuffled_aucs = []
    for seed in range(3):
        rng = np.random.default_rng(seed)
        shuffled = list(samples.verdicts)
        for start in range(0, len(shuffled), 4):
            shuffled[start : start + 4] = rng.permutation(shuffled[start : start + 4]).tolist()
        shuffled_aucs.append(_fit_and_rank(tiny_model, samples, shuffled)[0])
    assert np.mean(shuffled_aucs) < 0.7
