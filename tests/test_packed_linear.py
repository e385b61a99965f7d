"""Prefill projections through oneDNN with packed weights (engine/ops/packed_linear.py): same results as
F.linear, packed once and again only when a weight changes, never under autograd, quantization or other dtypes."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

from engine.ops import packed_linear
from engine.quant import quantize_model
from tests.conftest import make_model

pytestmark = pytest.mark.skipif(not packed_linear._available(), reason="torch without oneDNN's packed linear")


def prefill(model, ids):
    with torch.inference_mode():
        logits, state = model.prefill(ids)
    return logits, state.conv.clone(), state.ssm.clone()


def packed_names(model) -> list[list[str]]:
    return [sorted(layer.mixer._packed._entries) for layer in model.backbone.layers]


@pytest.fixture
def ids():
    return torch.randint(0, 256, (2, packed_linear.MIN_ROWS), generator=torch.Generator().manual_seed(0))


def test_packed_prefill_matches_f_linear(monkeypatch, ids):
    model = make_model(seed=3, d_model=64)
    monkeypatch.setenv(packed_linear.ENV_SWITCH, "0")
    reference = prefill(model, ids)
    assert packed_names(model) == [[], []]
    monkeypatch.setenv(packed_linear.ENV_SWITCH, "1")
    got = prefill(model, ids)
    assert packed_names(model) == [["dt_proj", "in_proj", "out_proj", "x_proj"]] * 2
    for g, r in zip(got, reference):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)


def test_small_weights_wait_for_many_rows_and_big_ones_do_not(monkeypatch):
    monkeypatch.setattr(packed_linear, "MIN_WEIGHTS", 64 * 256)  # in_proj (256 x 64) counts as big here
    model = make_model(seed=4, d_model=64)
    prefill(model, torch.randint(0, 256, (1, 3)))
    assert packed_names(model) == [["in_proj"]] * 2


def test_a_changed_weight_is_packed_again(ids):
    model = make_model(seed=5, d_model=64)
    prefill(model, ids)
    packed_before = model.backbone.layers[0].mixer._packed._entries["in_proj"][1]
    with torch.no_grad():
        model.backbone.layers[0].mixer.in_proj.weight.mul_(1.5)  # in place: same storage, a new version
    got = prefill(model, ids)
    assert model.backbone.layers[0].mixer._packed._entries["in_proj"][1] is not packed_before
    with packed_linear_off():
        expected = prefill(model, ids)
    for g, r in zip(got, expected):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)


class packed_linear_off:
    def __enter__(self):
        self.mp = pytest.MonkeyPatch()
        self.mp.setenv(packed_linear.ENV_SWITCH, "0")

    def __exit__(self, *exc):
        self.mp.undo()


def test_training_keeps_autograd_and_packs_nothing(ids):
    model = make_model(seed=6, d_model=64).train()
    logits, _ = model(ids)
    F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).backward()
    mixer = model.backbone.layers[0].mixer
    assert mixer.in_proj.weight.grad is not None and mixer.x_proj.weight.grad is not None
    assert packed_names(model) == [[], []]


def test_copies_conversions_and_quantized_models(ids):
    model = make_model(seed=7, d_model=64)
    reference = prefill(model, ids)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert packed_names(clone) == [[], []]  # copies pack again on use
        for g, r in zip(prefill(clone, ids), reference):
            torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)
    model.double()
    assert packed_names(model) == [[], []]  # .to()/.double() drop the packed copies of the old weights
    prefill(model, ids)
    assert packed_names(model) == [[], []]  # and float64 is not packed
    quantized = quantize_model(make_model(seed=7, d_model=64), "int8")
    prefill(quantized, ids)
    assert packed_names(quantized) == [[], []]


def test_planner_workers_leave_packing_off_unless_asked(monkeypatch):
    """A worker process holds its own model copy; packed prefill weights there are opt-in."""
    from planner.worker import WorkerSpec, set_up_worker

    monkeypatch.setattr("os.nice", lambda n: 0)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    monkeypatch.setenv(packed_linear.ENV_SWITCH, "")  # recorded first, so that teardown restores what was there
    monkeypatch.delenv(packed_linear.ENV_SWITCH)
    set_up_worker(WorkerSpec(checkpoint="unused"))
    assert not packed_linear.enabled()
    monkeypatch.setenv(packed_linear.ENV_SWITCH, "1")
    set_up_worker(WorkerSpec(checkpoint="unused"))
    assert packed_linear.enabled()


def test_the_second_copy_is_announced_once(monkeypatch, caplog, ids):
    monkeypatch.setattr(packed_linear, "_ANNOUNCED", False)
    with caplog.at_level("INFO", logger="engine.ops.packed_linear"):
        prefill(make_model(seed=8, d_model=64), ids)
        prefill(make_model(seed=9, d_model=64), ids)
    assert [r.getMessage().count(packed_linear.ENV_SWITCH) for r in caplog.records] == [1]


@pytest.mark.parametrize("value, on", [("0", False), ("off", False), (" False ", False), ("no", False),
                                       ("1", True), ("on", True), ("", True), ("bogus", True)])
def test_switch_values(monkeypatch, caplog, value, on):
    monkeypatch.setenv(packed_linear.ENV_SWITCH, value)
    monkeypatch.setattr(packed_linear, "_WARNED", set())
    with caplog.at_level("WARNING", logger="engine.ops.packed_linear"):
        assert packed_linear.enabled() is on
    assert bool(caplog.records) == (value == "bogus")
