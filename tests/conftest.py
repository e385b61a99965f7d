import os

import pytest
import torch
from hypothesis import HealthCheck, settings

from engine import MambaConfig, MambaLMHeadModel

settings.register_profile(
    "ci",
    max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "25")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    derandomize=True,
)
settings.load_profile("ci")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def reference_greedy(model: MambaLMHeadModel, prompt, n: int) -> list[int]:
    """Greedy tokens straight from the model, one sequence, no engine: what a served stream must equal."""
    with torch.inference_mode():
        logits, state = model.prefill(torch.tensor([list(prompt)]))
        out = []
        for _ in range(n):
            token = logits.argmax(-1)
            out.append(int(token))
            logits = model.step(token, state)
    return out


def make_model(seed: int = 0, **overrides) -> MambaLMHeadModel:
    """A tiny random model; non-trivial dt and A so every path matters."""
    base = dict(d_model=32, n_layer=2, vocab_size=261, d_state=8, d_conv=4, expand=2)
    base.update(overrides)
    torch.manual_seed(seed)
    model = MambaLMHeadModel(MambaConfig(**base))
    with torch.no_grad():
        for layer in model.backbone.layers:
            dt_bias = layer.mixer.dt_bias if base.get("layer") == "Mamba2" else layer.mixer.dt_proj.bias
            dt_bias.add_(torch.randn_like(dt_bias))
            layer.mixer.A_log.add_(0.3 * torch.randn_like(layer.mixer.A_log))
            layer.mixer.D.add_(torch.randn_like(layer.mixer.D))
            layer.norm.weight.add_(0.1 * torch.randn_like(layer.norm.weight))
    return model.eval()


@pytest.fixture
def tiny_model() -> MambaLMHeadModel:
    return make_model()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random byte-level checkpoint for the integration tests of one module (their servers load it)."""
    from tests.serving import tiny_checkpoint

    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="module")
def url(checkpoint):
    """A real server on loopback serving ``checkpoint`` (a module may define its own, with other options)."""
    from tests.serving import running_server

    with running_server(checkpoint, "--max-running", "32", "--max-waiting", "32") as base:
        yield base
