"""The planner net: shapes fit the engine's state, bounded outputs, stored with and loaded from a checkpoint."""

from __future__ import annotations

import torch

from engine.checkpoint import load_model, save_checkpoint, verify_checkpoint
from engine.models.planner_net import PlannerNet, load_planner
from tests.conftest import make_model


def test_dynamics_works_on_the_engine_state_and_heads_are_bounded():
    model = make_model(seed=2)
    net = PlannerNet.for_backbone(model)
    with torch.inference_mode():
        _, state = model.prefill(torch.randint(0, 200, (3, 9)))
        nxt = net.dynamics(state.ssm, torch.tensor([1, 2, 3]))
        assert nxt.shape == state.ssm.shape and bool(torch.isfinite(nxt).all())
        ev = net.evaluate(nxt)
    assert ev.logits.shape == (3, model.config.vocab_size)
    assert ev.layer_values.shape == (3, model.config.n_layer)
    assert bool((ev.value.abs() <= 1).all())
    spread = ev.layer_values.std(-1, unbiased=False)
    assert torch.allclose(ev.value, (ev.layer_values.mean(-1) - 0.1 * spread).clamp(-1, 1))
    decay = torch.stack([layer.mixer.A_log for layer in model.backbone.layers])
    assert torch.equal(net.A_log.detach(), decay.detach())


def test_planner_weights_travel_in_the_checkpoint(tmp_path):
    model = make_model(seed=3)
    net = PlannerNet.for_backbone(model)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    folder = save_checkpoint(model, tmp_path / "ckpt", extra_tensors=net.checkpoint_tensors(),
                             extra_files=net.checkpoint_files({"stage": "test"}))
    verify_checkpoint(folder)
    loaded = load_model(folder)  # the backbone loads as before: planner tensors are skipped
    planner = load_planner(folder, loaded.model)
    assert planner.trained and planner.record == {"stage": "test"}
    h = torch.randn(model.config.n_layer, 2, model.config.d_inner, model.config.d_state)
    with torch.inference_mode():
        assert torch.equal(planner.net.dynamics(h, torch.tensor([4, 5])), net.dynamics(h, torch.tensor([4, 5])))
    fresh = load_planner(save_checkpoint(model, tmp_path / "plain"), loaded.model)
    assert not fresh.trained
