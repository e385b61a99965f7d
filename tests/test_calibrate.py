"""The planner's confidence calibration: the fit recovers a known logistic, the stored one loads and verifies."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from engine.checkpoint import verify_checkpoint
from planner.calibration import load_calibration
from planner.offline.calibrate import fit_logistic, reliability, store
from planner.tree import Calibration, Node, confidence

DEFAULT = Path(__file__).resolve().parents[1] / "checkpoints" / "default"


def test_the_fit_recovers_a_known_logistic_and_is_calibrated():
    rng = np.random.default_rng(0)
    x = np.column_stack([rng.random(20000), rng.uniform(-1, 1, 20000)])
    true = np.array([-2.0, 3.0, 4.0])
    p = 1 / (1 + np.exp(-(true[0] + x @ true[1:])))
    y = (rng.random(len(p)) < p).astype(float)
    w = fit_logistic(x, y)
    assert np.allclose(w, true, atol=0.25), w
    stated = 1 / (1 + np.exp(-(w[0] + x @ w[1:])))
    for row in reliability(stated, y):
        assert abs(row["mean_stated"] - row["observed"]) < 0.05, row


def test_a_stored_calibration_loads_and_the_checkpoint_still_verifies(tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(DEFAULT, folder)
    cal = Calibration(-1.0, 2.0, 3.0, {"examples": 5})
    store(folder, cal.as_dict())
    verify_checkpoint(folder)  # size and hash of planner.json match the manifest again
    assert load_calibration(folder) == cal
    assert json.loads((folder / "planner.json").read_text())["calibration"]["w_share"] == 2.0
    assert load_calibration(tmp_path) is None  # no planner.json: uncalibrated


def test_confidence_uses_the_calibration_of_visit_share_and_value_advantage():
    root = Node(None, -1, 0, [1, 2], [0.5, 0.5], 0.0)
    for slot, (visits, q) in enumerate(((6, 0.5), (2, -0.5))):
        child = Node(root, root.actions[slot], slot + 1, [], [], q)
        child.visits, child.value_sum = visits, q * visits
        root.children[slot] = child
    root.visits, root.value_sum = 9, 0.0
    cal = Calibration(-1.0, 2.0, 3.0)
    share, advantage = 6 / 8, 0.5
    assert abs(confidence(root, cal) - 1 / (1 + np.exp(-(-1.0 + 2.0 * share + 3.0 * advantage)))) < 1e-9
    assert 0 < confidence(root) < 1  # uncalibrated: the old formula
    assert load_calibration(DEFAULT) is not None  # the shipped checkpoint is calibrated
